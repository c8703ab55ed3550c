//! Per-frame compression. `-z 1` is LZF, as in TDFS r3; `-z 2` is LZ4 (lz4_flex), several
//! times faster at a similar ratio. A payload that would not shrink is stored raw; a large
//! one is first probed with a sample, so incompressible data (media, archives) costs a 4 KiB
//! attempt, not a whole-payload one.

/// Compression chosen for a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lzf,
    Lz4,
}

impl Compression {
    pub fn from_level(z: u8) -> Option<Self> {
        match z {
            0 => Some(Self::None),
            1 => Some(Self::Lzf),
            2 => Some(Self::Lz4),
            _ => None,
        }
    }
}

/// Payloads shorter than this are never worth compressing.
const MIN_COMPRESS: usize = 64;

/// Payloads at least this large are probed with a sample before being compressed whole.
const PROBE_OVER: usize = 64 << 10;
const PROBE: usize = 4 << 10;

fn shrinks(input_len: usize, compressed_len: usize) -> bool {
    compressed_len + input_len / 16 < input_len
}

fn compress_with(c: Compression, input: &[u8]) -> Option<Vec<u8>> {
    match c {
        Compression::None => None,
        Compression::Lzf => lzf_compress(input),
        Compression::Lz4 => Some(lz4_flex::block::compress(input)),
    }
}

/// LZF by liblzf, the reference implementation (TDFS r3's codec, also Redis's), through
/// `lzf-sys`. The `lzf` crate's own compressor writes one byte past its buffer when a run of
/// exactly 32 literals fills it and a match follows (an index panic that ended a master's
/// link to a compressing slave for good); its decompressor is fuzzed here and stays. Only a
/// result that saves what [`shrinks`] asks for is of any use, so liblzf gets no more room
/// than that and gives up (returns 0) once past it.
fn lzf_compress(input: &[u8]) -> Option<Vec<u8>> {
    let room = input.len() - input.len() / 16;
    if input.len() > u32::MAX as usize || room == 0 {
        return None;
    }
    let mut out = vec![0u8; room];
    // SAFETY: liblzf reads `input.len()` bytes from `input` and writes at most `room` bytes
    // into `out`, which has exactly that many; neither buffer outlives the call.
    let n = unsafe {
        lzf_sys::lzf_compress(
            input.as_ptr().cast(),
            input.len() as std::os::raw::c_uint,
            out.as_mut_ptr().cast(),
            room as std::os::raw::c_uint,
        )
    };
    if n == 0 {
        return None;
    }
    out.truncate(n as usize);
    Some(out)
}

/// Whether a payload made of `parts` (in order) is large enough to be probed and its sample
/// does not shrink: then it goes raw, and a sender holding the parts apart can send them as
/// they are, without assembling the payload first.
pub fn sample_is_incompressible(c: Compression, parts: &[&[u8]]) -> bool {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if c == Compression::None || total < PROBE_OVER {
        return false;
    }
    // The middle: the start of a batch is headers and paths, which compress.
    let mut skip = total / 2;
    let mut gathered = Vec::new();
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let rest = &p[skip..];
        skip = 0;
        if gathered.is_empty() && rest.len() >= PROBE {
            // Within one part (always so for a contiguous payload): probe it in place.
            return incompressible(c, &rest[..PROBE]);
        }
        let take = rest.len().min(PROBE - gathered.len());
        gathered.extend_from_slice(&rest[..take]);
        if gathered.len() == PROBE {
            break;
        }
    }
    incompressible(c, &gathered)
}

fn incompressible(c: Compression, sample: &[u8]) -> bool {
    !compress_with(c, sample).is_some_and(|z| shrinks(sample.len(), z.len()))
}

/// Appends the compressed form of `input` to `out` and returns the flag naming the codec,
/// or leaves `out` as it was and returns `None` when compression would not save at least
/// 1/16 of the size.
pub(crate) fn compress_into(c: Compression, input: &[u8], out: &mut Vec<u8>) -> Option<u8> {
    if input.len() < MIN_COMPRESS || c == Compression::None {
        return None;
    }
    if sample_is_incompressible(c, &[input]) {
        return None;
    }
    match compress_with(c, input) {
        Some(z) if shrinks(input.len(), z.len()) => {
            out.extend_from_slice(&z);
            Some(match c {
                Compression::Lz4 => crate::frame::FLAG_LZ4,
                _ => crate::frame::FLAG_COMPRESSED,
            })
        }
        _ => None,
    }
}

/// Decompresses exactly `raw_len` bytes (already checked against the frame maximum).
pub(crate) fn decompress(flags: u8, input: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let out = if flags & crate::frame::FLAG_LZ4 != 0 {
        lz4_flex::block::decompress(input, raw_len).map_err(|e| e.to_string())?
    } else {
        lzf::decompress(input, raw_len).map_err(|e| format!("{e:?}"))?
    };
    if out.len() != raw_len {
        return Err(format!(
            "decompressed {} bytes, header says {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}
