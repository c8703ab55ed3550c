//! Validated relative paths: the only way a name reaches a slave.
//!
//! A [`WirePath`] is a list of components, each non-empty, at most [`MAX_NAME`] bytes, with no
//! `/` and no NUL, and never `.` or `..`. The empty list is the mirrored root itself. Because
//! every constructor validates, a slave that holds a `WirePath` can join it beneath its root
//! without further checks on the *names*; it still resolves it with `RESOLVE_BENEATH` so that a
//! symlink in its own tree cannot redirect it.

use std::fmt;

/// Longest single component (matches Linux NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Longest joined path in bytes (matches Linux PATH_MAX, without the NUL).
pub const MAX_PATH: usize = 4095;
/// Most components in one path (a path of one-byte names separated by `/`).
pub const MAX_DEPTH: usize = MAX_PATH.div_ceil(2);

/// Why a name or path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path component")]
    Empty,
    #[error("path component is `.` or `..`")]
    Dot,
    #[error("path component contains `/`")]
    Slash,
    #[error("path component contains NUL")]
    Nul,
    #[error("path component is {0} bytes, over the {MAX_NAME}-byte limit")]
    NameTooLong(usize),
    #[error("path is {0} bytes, over the {MAX_PATH}-byte limit")]
    PathTooLong(usize),
    #[error("path has {0} components, over the {MAX_DEPTH} limit")]
    TooDeep(usize),
}

/// Checks one component.
pub fn validate_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(PathError::Dot);
    }
    if name.len() > MAX_NAME {
        return Err(PathError::NameTooLong(name.len()));
    }
    if name.contains(&b'/') {
        return Err(PathError::Slash);
    }
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

/// A validated path relative to the mirrored root, stored joined with `/` so that it can be
/// handed to `openat2` without rebuilding it.
#[derive(Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct WirePath {
    joined: Vec<u8>,
}

impl WirePath {
    /// The mirrored root.
    pub fn root() -> Self {
        Self::default()
    }

    /// Builds a path from components, validating each and the whole.
    pub fn from_components<I, C>(comps: I) -> Result<Self, PathError>
    where
        I: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        let mut p = Self::root();
        for c in comps {
            p.push(c.as_ref())?;
        }
        Ok(p)
    }

    /// Parses a `/`-separated relative path (as typed by a user or test); empty components are
    /// refused rather than collapsed so that `a//b` cannot alias `a/b` silently.
    pub fn parse(s: &[u8]) -> Result<Self, PathError> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        Self::from_components(s.split(|&b| b == b'/'))
    }

    /// Appends one component.
    pub fn push(&mut self, name: &[u8]) -> Result<(), PathError> {
        validate_name(name)?;
        let new_len = self.joined.len() + usize::from(!self.joined.is_empty()) + name.len();
        if new_len > MAX_PATH {
            return Err(PathError::PathTooLong(new_len));
        }
        if !self.joined.is_empty() {
            self.joined.push(b'/');
        }
        self.joined.extend_from_slice(name);
        Ok(())
    }

    /// Returns `self/name`.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        let mut p = self.clone();
        p.push(name)?;
        Ok(p)
    }

    pub fn is_root(&self) -> bool {
        self.joined.is_empty()
    }

    /// The joined bytes (`a/b/c`; empty for the root).
    pub fn as_bytes(&self) -> &[u8] {
        &self.joined
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.joined.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.joined.iter().filter(|&&b| b == b'/').count() + 1
        }
    }

    /// Splits into (parent, last component); `None` for the root.
    pub fn split_last(&self) -> Option<(WirePath, &[u8])> {
        if self.is_root() {
            return None;
        }
        match self.joined.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((
                WirePath {
                    joined: self.joined[..i].to_vec(),
                },
                &self.joined[i + 1..],
            )),
            None => Some((WirePath::root(), &self.joined[..])),
        }
    }

    /// The parent directory (the root is its own parent).
    pub fn parent(&self) -> WirePath {
        self.split_last()
            .map(|(p, _)| p)
            .unwrap_or_else(WirePath::root)
    }

    /// True when `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &WirePath) -> bool {
        other.is_root()
            || self.joined == other.joined
            || (self.joined.starts_with(&other.joined)
                && self.joined.get(other.joined.len()) == Some(&b'/'))
    }

    /// Replaces the prefix `from` by `to` (used when a directory is renamed).
    pub fn rebase(&self, from: &WirePath, to: &WirePath) -> Option<WirePath> {
        if !self.starts_with(from) {
            return None;
        }
        let rest = if from.is_root() {
            &self.joined[..]
        } else {
            &self.joined[from.joined.len()..]
        };
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        let mut joined = to.joined.clone();
        if !joined.is_empty() && !rest.is_empty() {
            joined.push(b'/');
        }
        joined.extend_from_slice(rest);
        if joined.len() > MAX_PATH {
            return None;
        }
        Some(WirePath { joined })
    }

    /// Path for use with `*at` syscalls relative to the root fd: `.` for the root.
    pub fn to_at_path(&self) -> &[u8] {
        if self.is_root() {
            b"."
        } else {
            &self.joined
        }
    }
}

impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            write!(f, "/{}", String::from_utf8_lossy(&self.joined))
        }
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WirePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        assert_eq!(validate_name(b""), Err(PathError::Empty));
        assert_eq!(validate_name(b"."), Err(PathError::Dot));
        assert_eq!(validate_name(b".."), Err(PathError::Dot));
        assert_eq!(validate_name(b"a/b"), Err(PathError::Slash));
        assert_eq!(validate_name(b"a\0b"), Err(PathError::Nul));
        assert_eq!(
            validate_name(&[b'x'; 256]),
            Err(PathError::NameTooLong(256))
        );
        assert!(validate_name(&[b'x'; 255]).is_ok());
        assert!(validate_name(b"...").is_ok());
        assert!(WirePath::parse(b"/etc/passwd").is_err());
        assert!(WirePath::parse(b"a//b").is_err());
        assert!(WirePath::parse(b"a/../b").is_err());
    }

    #[test]
    fn path_limits() {
        let mut p = WirePath::root();
        let name = [b'n'; 255];
        for _ in 0..15 {
            p.push(&name).unwrap();
        }
        assert_eq!(p.as_bytes().len(), 15 * 256 - 1);
        p.push(&name).unwrap();
        assert_eq!(p.as_bytes().len(), MAX_PATH);
        assert!(matches!(p.push(b"x"), Err(PathError::PathTooLong(_))));
    }

    #[test]
    fn split_parent_rebase() {
        let p = WirePath::parse(b"a/b/c").unwrap();
        let (parent, last) = p.split_last().unwrap();
        assert_eq!(parent, WirePath::parse(b"a/b").unwrap());
        assert_eq!(last, b"c");
        assert_eq!(WirePath::parse(b"a").unwrap().parent(), WirePath::root());
        assert!(p.starts_with(&WirePath::parse(b"a").unwrap()));
        assert!(!WirePath::parse(b"ab/c")
            .unwrap()
            .starts_with(&WirePath::parse(b"a").unwrap()));
        let r = p
            .rebase(
                &WirePath::parse(b"a").unwrap(),
                &WirePath::parse(b"x/y").unwrap(),
            )
            .unwrap();
        assert_eq!(r, WirePath::parse(b"x/y/b/c").unwrap());
        assert_eq!(p.depth(), 3);
        assert_eq!(WirePath::root().to_at_path(), b".");
    }
}
