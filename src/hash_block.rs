//! Input buffering shared by the hashes built on 64-byte blocks (MD5 in `s3::md5`, SHA-256 in
//! `client::sha256`): data arrives in pieces of any size, the compression function sees whole
//! blocks, in order.

pub const BLOCK_BYTES: usize = 64;

#[derive(Clone)]
pub struct BlockBuffer {
    /// Bytes of a partial block not yet compressed.
    pending: [u8; BLOCK_BYTES],
    /// How many of `pending` are in use (always < BLOCK_BYTES between calls).
    pending_len: usize,
    /// Message length so far, in bytes.
    total: u64,
}

impl Default for BlockBuffer {
    fn default() -> Self {
        BlockBuffer::new()
    }
}

impl BlockBuffer {
    pub const fn new() -> BlockBuffer {
        BlockBuffer {
            pending: [0; BLOCK_BYTES],
            pending_len: 0,
            total: 0,
        }
    }

    /// Message bytes fed so far.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Bytes waiting for the rest of their block.
    pub fn pending_len(&self) -> usize {
        self.pending_len
    }

    /// Feeds `data`, calling `compress` on every block it completes.
    pub fn update(&mut self, mut data: &[u8], mut compress: impl FnMut(&[u8; BLOCK_BYTES])) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.pending_len > 0 {
            let take = (BLOCK_BYTES - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < BLOCK_BYTES {
                return;
            }
            compress(&self.pending);
            self.pending_len = 0;
        }
        let mut blocks = data.chunks_exact(BLOCK_BYTES);
        for block in &mut blocks {
            compress(block.try_into().expect("64-byte chunk"));
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }
}
