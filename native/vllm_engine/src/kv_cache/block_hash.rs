//! Prefix-cache keys of full blocks: hash(parent block's hash, the block's tokens, extra
//! keys). The chain makes a block's hash stand for the whole prefix up to its end.
//!
//! 128 bits (two SipHash-1-3 streams over domain-separated input, fixed keys): a
//! collision, which would hand one request another's keys and values, is out of reach.

use std::hash::{DefaultHasher, Hash, Hasher};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

/// What besides the tokens decides a block's keys and values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ExtraKeys {
    /// Blocks computed with a LoRA adapter differ from the base model's.
    pub lora_int_id: Option<u32>,
    /// Separates tenants: requests with different salts never share blocks (vLLM puts it
    /// in the first block only; the chain carries it to the rest).
    pub cache_salt: Option<String>,
}

pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32], extra: &ExtraKeys, first: bool) -> BlockHash {
    let half = |domain: u8| {
        // DefaultHasher::new() is SipHash-1-3 with fixed keys: stable within a process.
        let mut h = DefaultHasher::new();
        domain.hash(&mut h);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        extra.lora_int_id.hash(&mut h);
        if first {
            extra.cache_salt.hash(&mut h);
        }
        h.finish()
    };
    BlockHash(((half(0x5a) as u128) << 64) | half(0xa5) as u128)
}

/// Extends `hashes` to cover every full block of `tokens`.
pub fn extend_block_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize, extra: &ExtraKeys) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let block = &tokens[i * block_size..(i + 1) * block_size];
        let h = hash_block(hashes.last().copied(), block, extra, i == 0);
        hashes.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_covers_its_whole_prefix_and_extra_keys() {
        let none = ExtraKeys::default();
        let mut a = Vec::new();
        extend_block_hashes(&mut a, &[1, 2, 3, 4, 5, 6, 7], 2, &none);
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        extend_block_hashes(&mut b, &[9, 2, 3, 4], 2, &none);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "same tokens, different parent");
        let mut c = Vec::new();
        extend_block_hashes(
            &mut c,
            &[1, 2, 3, 4],
            2,
            &ExtraKeys {
                lora_int_id: Some(1),
                cache_salt: None,
            },
        );
        assert_ne!(a[0], c[0]);
        let mut d = Vec::new();
        extend_block_hashes(
            &mut d,
            &[1, 2, 3, 4],
            2,
            &ExtraKeys {
                lora_int_id: None,
                cache_salt: Some("t".into()),
            },
        );
        assert_ne!(a[0], d[0]);
        assert_ne!(a[1], d[1]);
        let mut e = Vec::new();
        extend_block_hashes(&mut e, &[1, 2, 3, 4, 5, 6], 2, &none);
        assert_eq!(&a[..3], &e[..3]);
    }
}
