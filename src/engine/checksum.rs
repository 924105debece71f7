//! CRC-32C (Castagnoli, the `crc` crate's CRC_32_ISCSI), the checksum of every persisted
//! record. Slice-by-16 tables: this runs on every page read and written.

use crc::{Crc, Table, CRC_32_ISCSI};

pub static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

pub fn crc32c(data: &[u8]) -> u32 {
    CRC32C.checksum(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_vector() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
    }
}
