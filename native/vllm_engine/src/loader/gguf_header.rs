//! A bounds check of a GGUF header before candle parses it. candle's parser allocates
//! whatever lengths the file claims, so a corrupt length would abort the process on a
//! failed allocation; here every length is checked against the bytes the file really has.

use std::io::{BufReader, Read, Seek};

/// Walks the header of a GGUF file of `file_len` bytes; Err names the first impossible field.
pub fn check<R: Read + Seek>(reader: &mut BufReader<R>, file_len: u64) -> Result<(), String> {
    let mut walker = Walker {
        reader,
        file_len,
        pos: 0,
    };
    let magic = walker.u32()?;
    if magic != u32::from_le_bytes(*b"GGUF") {
        return Err("the file does not start with the GGUF magic".into());
    }
    let version = walker.u32()?;
    let wide = match version {
        1 => false,
        2 | 3 => true,
        v => return Err(format!("unknown GGUF version {v}")),
    };
    let tensor_count = walker.count(wide)?;
    let kv_count = walker.count(wide)?;
    walker.need(kv_count.saturating_mul(13), "metadata entries")?;
    for _ in 0..kv_count {
        walker.string(wide)?;
        let value_type = walker.u32()?;
        walker.value(value_type, wide)?;
    }
    walker.need(tensor_count.saturating_mul(24), "tensor entries")?;
    for _ in 0..tensor_count {
        walker.string(wide)?;
        let dims = walker.u32()?;
        if dims > 4 {
            return Err(format!("a tensor claims {dims} dimensions (at most 4)"));
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = walker.count(wide)?;
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or("a tensor's shape is absurdly large")?;
        }
        walker.skip(4 + 8)?; // ggml type, data offset
    }
    Ok(())
}

struct Walker<'a, R> {
    reader: &'a mut BufReader<R>,
    file_len: u64,
    pos: u64,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn need(&self, bytes: u64, what: &str) -> Result<(), String> {
        if bytes > self.file_len.saturating_sub(self.pos) {
            return Err(format!(
                "{what} need {bytes} bytes at offset {} but the file has {} (truncated?)",
                self.pos, self.file_len
            ));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        self.need(N as u64, "the header")?;
        let mut buf = [0u8; N];
        self.reader
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read the header: {e}"))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }

    fn count(&mut self, wide: bool) -> Result<u64, String> {
        if wide {
            Ok(u64::from_le_bytes(self.bytes::<8>()?))
        } else {
            Ok(self.u32()? as u64)
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        self.need(n, "the header")?;
        // seek_relative keeps BufReader's buffer, unlike seek.
        self.reader
            .seek_relative(n as i64)
            .map_err(|e| format!("cannot seek in the header: {e}"))?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, wide: bool) -> Result<(), String> {
        let len = self.count(wide)?;
        self.skip(len)
    }

    fn value(&mut self, value_type: u32, wide: bool) -> Result<(), String> {
        match value_type {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string(wide),
            9 => {
                let item_type = self.u32()?;
                let len = self.count(wide)?;
                let min_item = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if wide {
                            8
                        } else {
                            4
                        }
                    }
                    9 => 12,
                    t => return Err(format!("unknown GGUF array item type {t}")),
                };
                self.need(len.saturating_mul(min_item), "a metadata array")?;
                match item_type {
                    // Fixed-size items: skip the whole array at once.
                    0..=7 | 10..=12 => self.skip(len * min_item),
                    _ => (0..len).try_for_each(|_| self.value(item_type, wide)),
                }
            }
            t => Err(format!("unknown GGUF value type {t}")),
        }
    }
}
