#!/usr/bin/env python3
"""Compare two directory trees strictly enough to catch a bad replica.

Usage: treecmp.py [--no-root] [--content-only] REFERENCE REPLICA

REFERENCE is the master's backing directory, REPLICA the slave's mirror.
Every entry is examined with lstat (symlinks are never followed) and compared on:
file type, size, content, mode & 0o7777, uid, gid, mtime (ns), symlink target,
rdev (device nodes), user.* and trusted.* xattrs, and hard-link groups
(the set of paths in the tree sharing one inode).

--no-root        do not compare the metadata of the two root directories themselves
--content-only   names, types, sizes, bytes and symlink targets only

Prints one line per difference and exits 1 if there is any, 0 if the trees
are identical, 2 on a usage error.
"""

import os
import stat
import sys

CHUNK = 1 << 20
XATTR_PREFIXES = ("user.", "trusted.")


def kind_of(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    return "unknown"


def walk(root, errors):
    """Map relative path -> lstat result, never following symlinks."""
    entries = {}
    try:
        entries["."] = os.lstat(root)
    except OSError as e:
        errors.append((".", "cannot stat root %s: %s" % (root, e)))
        return entries
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        try:
            names = os.listdir(full)
        except OSError as e:
            errors.append((rel or ".", "cannot list %s: %s" % (full, e)))
            continue
        for name in names:
            crel = os.path.join(rel, name) if rel else name
            try:
                st = os.lstat(os.path.join(root, crel))
            except OSError as e:
                errors.append((crel, "cannot stat: %s" % e))
                continue
            entries[crel] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(crel)
    return entries


def first_content_diff(pa, pb):
    """Byte offset of the first difference of two same-size files, or None."""
    with open(pa, "rb", buffering=0) as fa, open(pb, "rb", buffering=0) as fb:
        off = 0
        while True:
            a = fa.read(CHUNK)
            b = fb.read(CHUNK)
            if a != b:
                n = min(len(a), len(b))
                for i in range(n):
                    if a[i] != b[i]:
                        return off + i
                return off + n
            if not a:
                return None
            off += len(a)


def xattrs(path):
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(XATTR_PREFIXES):
            try:
                out[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                out[name] = ("<error>", str(e))
    return out


def link_groups(entries):
    """relative path -> sorted tuple of all paths sharing its inode (non-dirs only)."""
    by_ino = {}
    for rel, st in entries.items():
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault((st.st_dev, st.st_ino), []).append(rel)
    groups = {}
    for paths in by_ino.values():
        t = tuple(sorted(paths))
        for p in paths:
            groups[p] = t
    return groups


def compare(ref, rep, metadata=True, with_xattrs=True, hardlinks=True, root=True):
    diffs = []
    errors = []
    ea = walk(ref, errors)
    eb = walk(rep, errors)
    for rel, msg in errors:
        diffs.append((rel, msg))
    ga = link_groups(ea) if hardlinks else {}
    gb = link_groups(eb) if hardlinks else {}

    for rel in sorted(set(ea) | set(eb)):
        if rel not in eb:
            diffs.append((rel, "missing in replica"))
            continue
        if rel not in ea:
            diffs.append((rel, "extra in replica"))
            continue
        a, b = ea[rel], eb[rel]
        pa, pb = os.path.join(ref, rel), os.path.join(rep, rel)
        ka, kb = kind_of(a.st_mode), kind_of(b.st_mode)
        if ka != kb:
            diffs.append((rel, "file type %s vs %s" % (ka, kb)))
            continue
        if ka == "file":
            if a.st_size != b.st_size:
                diffs.append((rel, "size %d vs %d" % (a.st_size, b.st_size)))
            else:
                try:
                    off = first_content_diff(pa, pb)
                    if off is not None:
                        diffs.append((rel, "content differs from byte %d" % off))
                except OSError as e:
                    diffs.append((rel, "cannot compare content: %s" % e))
        elif ka == "symlink":
            try:
                ta, tb = os.readlink(pa), os.readlink(pb)
                if ta != tb:
                    diffs.append((rel, "symlink target %s vs %s" % (ta, tb)))
            except OSError as e:
                diffs.append((rel, "cannot read link: %s" % e))

        if rel == "." and not root:
            continue
        if metadata:
            ma, mb = stat.S_IMODE(a.st_mode), stat.S_IMODE(b.st_mode)
            if ma != mb:
                diffs.append((rel, "mode %04o vs %04o" % (ma, mb)))
            if a.st_uid != b.st_uid:
                diffs.append((rel, "uid %d vs %d" % (a.st_uid, b.st_uid)))
            if a.st_gid != b.st_gid:
                diffs.append((rel, "gid %d vs %d" % (a.st_gid, b.st_gid)))
            if a.st_mtime_ns != b.st_mtime_ns:
                diffs.append(
                    (
                        rel,
                        "mtime %d.%09d vs %d.%09d"
                        % (divmod(a.st_mtime_ns, 10**9) + divmod(b.st_mtime_ns, 10**9)),
                    )
                )
            if ka in ("char", "block") and a.st_rdev != b.st_rdev:
                diffs.append(
                    (
                        rel,
                        "device %d:%d vs %d:%d"
                        % (
                            os.major(a.st_rdev),
                            os.minor(a.st_rdev),
                            os.major(b.st_rdev),
                            os.minor(b.st_rdev),
                        ),
                    )
                )
        if with_xattrs:
            try:
                xa, xb = xattrs(pa), xattrs(pb)
            except OSError as e:
                diffs.append((rel, "cannot list xattrs: %s" % e))
            else:
                for name in sorted(set(xa) | set(xb)):
                    if name not in xb:
                        diffs.append((rel, "xattr %s missing in replica" % name))
                    elif name not in xa:
                        diffs.append((rel, "xattr %s extra in replica" % name))
                    elif xa[name] != xb[name]:
                        diffs.append((rel, "xattr %s value differs" % name))
        if hardlinks and ka != "dir":
            la, lb = ga.get(rel, (rel,)), gb.get(rel, (rel,))
            if la != lb:
                diffs.append((rel, "hard-link group %s vs %s" % (list(la), list(lb))))
    return diffs, len(ea), len(eb)


def main(argv):
    opts = {"metadata": True, "with_xattrs": True, "hardlinks": True, "root": True}
    paths = []
    for arg in argv[1:]:
        if arg == "--no-root":
            opts["root"] = False
        elif arg == "--content-only":
            opts.update(metadata=False, with_xattrs=False, hardlinks=False, root=False)
        elif arg in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        elif arg.startswith("-"):
            print("treecmp.py: unknown option %s" % arg, file=sys.stderr)
            return 2
        else:
            paths.append(arg)
    if len(paths) != 2:
        print("usage: treecmp.py [--no-root] [--content-only] REFERENCE REPLICA", file=sys.stderr)
        return 2
    ref, rep = paths
    diffs, na, nb = compare(ref, rep, **opts)
    for rel, msg in diffs:
        print("%s: %s" % (rel, msg))
    if diffs:
        print(
            "treecmp: %d difference(s) between %s (%d entries) and %s (%d entries)"
            % (len(diffs), ref, na, rep, nb),
            file=sys.stderr,
        )
        return 1
    print("treecmp: identical (%d entries): %s == %s" % (na, ref, rep), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
