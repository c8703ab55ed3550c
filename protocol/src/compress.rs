//! Per-frame compression. `-z 1` is LZF, as in TDFS r3. A payload that would not shrink is
//! stored raw, so incompressible data costs one failed attempt and no extra bytes.

/// Compression chosen for a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lzf,
}

impl Compression {
    pub fn from_level(z: u8) -> Option<Self> {
        match z {
            0 => Some(Self::None),
            1 => Some(Self::Lzf),
            _ => None,
        }
    }
}

/// Payloads shorter than this are never worth compressing.
const MIN_COMPRESS: usize = 64;

/// Appends the compressed form of `input` to `out` and returns true, or leaves `out` as it
/// was and returns false when compression would not save at least 1/16 of the size.
pub(crate) fn compress_into(input: &[u8], out: &mut Vec<u8>) -> bool {
    if input.len() < MIN_COMPRESS {
        return false;
    }
    match lzf::compress(input) {
        Ok(c) if c.len() + input.len() / 16 < input.len() => {
            out.extend_from_slice(&c);
            true
        }
        // The lzf crate reports incompressible input as an error; both cases mean "send raw".
        _ => false,
    }
}

/// Decompresses exactly `raw_len` bytes (already checked against the frame maximum).
pub(crate) fn decompress(input: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let out = lzf::decompress(input, raw_len).map_err(|e| format!("{e:?}"))?;
    if out.len() != raw_len {
        return Err(format!(
            "decompressed {} bytes, header says {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}
