//! A small, deterministic input mutator for the stable harness that `cargo test` runs (libFuzzer
//! does its own mutation under `cargo fuzz`). It knows the shapes our decoders read: big-endian
//! and varint length fields (so it writes boundary integers), JSON and TOML text (so it swaps
//! numbers and strings for extreme ones), and records (so it splices inputs together).

/// SplitMix64: a tiny seeded generator, so a failure replays from its seed alone, whatever the
/// `rand` crate's version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers at the edges of what length fields, counts, heights and amounts hold.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    4096,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// Text that breaks parsers of JSON and TOML values.
const INTERESTING_TEXT: &[&str] = &[
    "0",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "4294967295",
    "4294967296",
    "2147483648",
    "1e400",
    "-0.0",
    "NaN",
    "null",
    "true",
    "\"\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "\"0.0.0.0:0\"",
    "\"[::1]:65535\"",
    "\"1.5KiB\"",
    "\"500MB\"",
    "\"1.3GB\"",
    "\"99999999999PiB\"",
    "\"0.1B\"",
    "\"\u{10ffff}\"",
];

/// A mutation of `input`: one to four edits stacked, drawn from `rng`, occasionally spliced with
/// another input of `corpus`. The result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        edit(rng, &mut out, corpus);
    }
    out.truncate(max_len);
    out
}

fn edit(rng: &mut Rng, out: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = out.len();
    let at = rng.below(len + 1);
    match rng.below(12) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            out[i] ^= 1 << rng.below(8);
        }
        // Set one byte to anything.
        1 if len > 0 => {
            let i = rng.below(len);
            out[i] = rng.next_u64() as u8;
        }
        // Overwrite a 1, 2, 4 or 8-byte big-endian (or little-endian) integer with an edge value.
        2 | 3 => {
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let value = match rng.below(4) {
                0 => rng.pick(INTERESTING).wrapping_sub(1),
                1 => rng.pick(INTERESTING).wrapping_add(1),
                _ => *rng.pick(INTERESTING),
            };
            let field = if rng.below(4) == 0 {
                value.to_le_bytes()[..width].to_vec()
            } else {
                value.to_be_bytes()[8 - width..].to_vec()
            };
            let end = (at + width).min(len);
            out.splice(at..end, field);
        }
        // Write a varint (commonware-codec lengths) of an edge value.
        4 => {
            let mut value = *rng.pick(INTERESTING) >> rng.below(40);
            let mut varint = Vec::new();
            loop {
                let byte = (value & 0x7f) as u8;
                value >>= 7;
                if value == 0 {
                    varint.push(byte);
                    break;
                }
                varint.push(byte | 0x80);
            }
            let end = (at + varint.len()).min(len);
            out.splice(at..end, varint);
        }
        // Delete a range.
        5 if len > 0 => {
            let n = 1 + rng.below((len - at).clamp(1, 64));
            out.drain(at..(at + n).min(len));
        }
        // Duplicate a range (repeated records, repeated JSON members).
        6 if len > 0 => {
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(256));
            let chunk = out[from..from + n].to_vec();
            for _ in 0..=rng.below(3) {
                out.splice(at..at, chunk.iter().copied());
            }
        }
        // Insert random bytes.
        7 => {
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            out.splice(at..at, bytes);
        }
        // Cut the end off (torn writes, truncated messages).
        8 if len > 0 => out.truncate(rng.below(len)),
        // Splice: this input's head and another input's tail.
        9 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            let from = rng.below(other.len() + 1);
            out.truncate(at);
            out.extend_from_slice(&other[from..]);
        }
        // Text: replace a number or a quoted string with an extreme value.
        10 | 11 => replace_token(rng, out),
        _ => {
            let i = rng.below(len + 1);
            out.insert(i, *rng.pick(b"\"{}[],:0-9.\\\n=# \x00\xff"));
        }
    }
}

/// Replaces the number or quoted string starting at a random position of a text input.
fn replace_token(rng: &mut Rng, out: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..out.len())
        .filter(|&i| {
            let c = out[i];
            (c.is_ascii_digit() || c == b'"') && (i == 0 || !out[i - 1].is_ascii_alphanumeric())
        })
        .collect();
    if starts.is_empty() {
        return;
    }
    let start = *rng.pick(&starts);
    let end = if out[start] == b'"' {
        out[start + 1..].iter().position(|&c| c == b'"').map_or(out.len(), |p| start + p + 2)
    } else {
        out[start..].iter().position(|c| !(c.is_ascii_digit() || *c == b'.')).map_or(out.len(), |p| start + p)
    };
    let replacement = rng.pick(INTERESTING_TEXT).as_bytes().to_vec();
    out.splice(start..end, replacement);
}
