//! Column encryption and keyed hashes of the PostgreSQL engine.
//!
//! Home-made glue over aws-lc-rs (AES-256-GCM, random nonces) and RustCrypto's
//! `hkdf`/`hmac`: no library encrypts individual PostgreSQL columns with
//! searchable keyed hashes, and keeping patient data out of the database in
//! plaintext is the product here (issue 12).
//!
//! - Two keys derive from the index key given to `Index::open_postgres`
//!   (HKDF-SHA256, no salt): `bastion index pg columns v1` (AES-256-GCM) and
//!   `bastion index pg search v1` (HMAC-SHA256).
//! - A sealed column is `nonce (12) ‖ ciphertext ‖ tag (16)` of the row's
//!   identifying fields, each a big-endian `u32` length and its UTF-8 bytes,
//!   zero-padded to a multiple of [`PAD`] bytes so the ciphertext length
//!   tells little about the values. The associated data binds it to its
//!   table and row key (a sealed value copied to another row does not open).
//! - A keyed hash is `HMAC(search key, domain ‖ 0x00 ‖ value)`: equal values
//!   in one domain give equal hashes (that is what makes them searchable),
//!   nothing else about the value is visible.

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::IndexError;

/// Sealed plaintexts are padded to a multiple of this many bytes.
pub(crate) const PAD: usize = 32;
/// Patient's Name prefixes of 1..=`NAME_PREFIX_MAX` characters are hashed;
/// every patient has exactly this many rows in `patient_name_prefixes`
/// (shorter names get keyed dummy hashes), so the row count says nothing
/// about the name's length.
pub(crate) const NAME_PREFIX_MAX: usize = 8;
/// Bytes kept of a name-prefix hash (the side table is the largest one).
const PREFIX_HASH_LEN: usize = 16;

/// The column key and the search key of one index.
pub(crate) struct Keys {
    aead: RandomizedNonceKey,
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

fn crypto(reason: &'static str) -> IndexError {
    IndexError::Crypto { reason }
}

impl Keys {
    /// Derives both keys from the index key.
    pub(crate) fn derive(index_key: &[u8; 32]) -> Result<Keys, IndexError> {
        let hk = Hkdf::<Sha256>::new(None, index_key);
        let mut enc = Zeroizing::new([0u8; 32]);
        let mut search = Zeroizing::new([0u8; 32]);
        hk.expand(b"bastion index pg columns v1", &mut enc[..])
            .map_err(|_| crypto("key derivation"))?;
        hk.expand(b"bastion index pg search v1", &mut search[..])
            .map_err(|_| crypto("key derivation"))?;
        Ok(Keys {
            aead: RandomizedNonceKey::new(&AES_256_GCM, &enc[..])
                .map_err(|_| crypto("column key"))?,
            mac: Hmac::<Sha256>::new_from_slice(&search[..]).map_err(|_| crypto("search key"))?,
        })
    }

    /// Encrypts `fields` for the row whose table and key are `aad`.
    pub(crate) fn seal(&self, aad: &[u8], fields: &[&str]) -> Result<Vec<u8>, IndexError> {
        let len: usize = fields.iter().map(|f| 4 + f.len()).sum();
        let padded = len.div_ceil(PAD).max(1) * PAD;
        let mut buf = Vec::with_capacity(NONCE_LEN + padded + 16);
        for f in fields {
            let n = u32::try_from(f.len()).map_err(|_| IndexError::ValueOutOfRange {
                field: "encrypted column",
            })?;
            buf.extend_from_slice(&n.to_be_bytes());
            buf.extend_from_slice(f.as_bytes());
        }
        buf.resize(padded, 0);
        let nonce = self
            .aead
            .seal_in_place_append_tag(Aad::from(aad), &mut buf)
            .map_err(|_| crypto("encrypt column"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Decrypts a [`seal`](Self::seal)ed value of `n` fields.
    pub(crate) fn open(
        &self,
        aad: &[u8],
        sealed: &[u8],
        n: usize,
    ) -> Result<Vec<String>, IndexError> {
        let undecryptable = || crypto("a column does not decrypt (wrong key or altered row)");
        if sealed.len() < NONCE_LEN {
            return Err(undecryptable());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| undecryptable())?;
        let mut ct = Zeroizing::new(ct.to_vec());
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(aad), &mut ct[..])
            .map_err(|_| undecryptable())?;
        let mut fields = Vec::with_capacity(n);
        let mut rest: &[u8] = plain;
        for _ in 0..n {
            let (len, tail) = rest.split_at_checked(4).ok_or_else(undecryptable)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            let len = usize::try_from(len).map_err(|_| undecryptable())?;
            let (value, tail) = tail.split_at_checked(len).ok_or_else(undecryptable)?;
            fields.push(String::from_utf8(value.to_vec()).map_err(|_| undecryptable())?);
            rest = tail;
        }
        Ok(fields)
    }

    /// The keyed hash of `value` in `domain` (32 bytes).
    pub(crate) fn hash(&self, domain: &str, value: &[u8]) -> Vec<u8> {
        self.hash_parts(domain, &[value])
    }

    /// The keyed hash of several values in `domain`, each length-prefixed
    /// (no two tuples hash the same input).
    pub(crate) fn hash_parts(&self, domain: &str, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }

    /// The `patient_name_prefixes` hashes of one patient: the keyed hashes of
    /// the first 1..=[`NAME_PREFIX_MAX`] characters of the name with ASCII
    /// letters upper-cased (the SQLite engine's `LIKE` is case-insensitive
    /// for ASCII only), then keyed dummies (from the patient key) up to
    /// [`NAME_PREFIX_MAX`] rows. A name with several values or component
    /// groups gets dummies only: such rows are kept by every name filter.
    pub(crate) fn name_prefixes(&self, key_hash: &[u8], name: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(NAME_PREFIX_MAX);
        if !name_unsure(name) {
            let norm = name.to_ascii_uppercase();
            for (i, c) in norm.char_indices().take(NAME_PREFIX_MAX) {
                out.push(self.prefix_hash(&norm[..i + c.len_utf8()]));
            }
        }
        let mut dummy = 0u8;
        while out.len() < NAME_PREFIX_MAX {
            let mut h = self.hash_parts("name-prefix-dummy", &[key_hash, &[dummy]]);
            h.truncate(PREFIX_HASH_LEN);
            out.push(h);
            dummy += 1;
        }
        out
    }

    /// The hash to look up for a query prefix (the archive's PN wildcard
    /// prefix, e.g. `DOE^J`): its first [`NAME_PREFIX_MAX`] characters,
    /// normalised as stored; `None` for an empty prefix (matches every name).
    pub(crate) fn name_prefix_query(&self, prefix: &str) -> Option<Vec<u8>> {
        let norm = prefix.to_ascii_uppercase();
        let end = norm
            .char_indices()
            .nth(NAME_PREFIX_MAX)
            .map_or(norm.len(), |(i, _)| i);
        if end == 0 {
            return None;
        }
        Some(self.prefix_hash(&norm[..end]))
    }

    fn prefix_hash(&self, prefix: &str) -> Vec<u8> {
        let mut h = self.hash("name-prefix", prefix.as_bytes());
        h.truncate(PREFIX_HASH_LEN);
        h
    }

    /// A transaction advisory lock key for `value` of `kind` (a UID): equal
    /// values give equal keys; a collision only serialises two writers.
    pub(crate) fn lock_key(&self, kind: &str, value: &str) -> i64 {
        let h = self.hash(kind, value.as_bytes());
        i64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }
}

/// Whether a Patient's Name holds several values (`\`) or component groups
/// (`=`): the SQLite engine keeps those for the matcher under every prefix
/// filter, and so does this one.
pub(crate) fn name_unsure(name: &str) -> bool {
    name.contains('=') || name.contains('\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_fields_round_trip_and_are_bound_to_their_row() -> Result<(), IndexError> {
        let k = Keys::derive(&[9u8; 32])?;
        let sealed = k.seal(b"patients/a", &["Doe^John", "", "19700101"])?;
        assert_eq!((sealed.len() - NONCE_LEN - 16) % PAD, 0);
        assert!(!sealed.windows(8).any(|w| w == b"Doe^John"));
        assert_eq!(
            k.open(b"patients/a", &sealed, 3)?,
            vec!["Doe^John".to_owned(), String::new(), "19700101".to_owned()]
        );
        assert!(k.open(b"patients/b", &sealed, 3).is_err());
        let other = Keys::derive(&[8u8; 32])?;
        assert!(other.open(b"patients/a", &sealed, 3).is_err());
        Ok(())
    }

    #[test]
    fn name_prefixes_are_padded_and_match_queries_case_insensitively() -> Result<(), IndexError> {
        let k = Keys::derive(&[9u8; 32])?;
        let short = k.name_prefixes(b"p1", "Li^Bo");
        let long = k.name_prefixes(b"p2", "Doe^Johnathan");
        assert_eq!(short.len(), NAME_PREFIX_MAX);
        assert_eq!(long.len(), NAME_PREFIX_MAX);
        let q = |p: &str| k.name_prefix_query(p);
        assert!(q("li").is_some_and(|h| short.contains(&h)));
        assert!(q("LI^B").is_some_and(|h| short.contains(&h)));
        assert!(q("doe^johnATHAN").is_some_and(|h| long.contains(&h)));
        assert!(q("DOE^X").is_some_and(|h| !long.contains(&h)));
        assert_eq!(q(""), None);
        // Several values: dummies only.
        let multi = k.name_prefixes(b"p3", "Doe^J\\Roe^R");
        assert!(q("D").is_some_and(|h| !multi.contains(&h)));
        Ok(())
    }
}
