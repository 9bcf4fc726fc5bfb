//! What a registered device may do and how it must connect.

use std::{fmt, str::FromStr};

use crate::ModelError;

/// A DIMSE service a device may request of Bastion (PS3.4 Annexes A, B, C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// C-ECHO, Verification SOP Class (PS3.4 Annex A).
    Echo,
    /// C-STORE as Storage SCU towards us (PS3.4 Annex B).
    Store,
    /// C-FIND, Query/Retrieve (PS3.4 Annex C).
    Find,
    /// C-MOVE, Query/Retrieve (PS3.4 Annex C).
    Move,
    /// C-GET, Query/Retrieve (PS3.4 Annex C).
    Get,
}

impl Permission {
    /// Every permission, in canonical order.
    pub const ALL: [Permission; 5] = [
        Permission::Echo,
        Permission::Store,
        Permission::Find,
        Permission::Move,
        Permission::Get,
    ];

    /// The CLI / storage name (`echo`, `store`, …).
    pub fn name(self) -> &'static str {
        match self {
            Permission::Echo => "echo",
            Permission::Store => "store",
            Permission::Find => "find",
            Permission::Move => "move",
            Permission::Get => "get",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Permission::Echo => 1,
            Permission::Store => 2,
            Permission::Find => 4,
            Permission::Move => 8,
            Permission::Get => 16,
        }
    }
}

impl FromStr for Permission {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| ModelError::UnknownPermission(s.to_owned()))
    }
}

/// A non-empty set of [`Permission`]s, written `echo,store` on the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PermissionSet(u8);

impl PermissionSet {
    /// Parses a comma-separated, non-empty list such as `echo,store`.
    ///
    /// # Errors
    /// [`ModelError::UnknownPermission`] for an empty list or an unknown name.
    pub fn parse_list(list: &str) -> Result<PermissionSet, ModelError> {
        let mut bits = 0u8;
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            bits |= item.parse::<Permission>()?.bit();
        }
        if bits == 0 {
            return Err(ModelError::UnknownPermission(list.to_owned()));
        }
        Ok(PermissionSet(bits))
    }

    /// Whether `p` is in the set.
    pub fn allows(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// The permissions in canonical order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| self.allows(*p))
    }
}

impl fmt::Display for PermissionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Permission::name).collect();
        f.write_str(&names.join(","))
    }
}

/// How a device must connect (DESIGN §2 "devices"; PS3.15 Annex B.1 for TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// DICOM over TLS on the TLS listener; a client certificate is optional
    /// and must chain to Bastion's CA when sent.
    Tls,
    /// DICOM over TLS with a required client certificate that chains to
    /// Bastion's CA or matches the device's pinned SHA-256 fingerprint.
    Mtls,
    /// Unencrypted DICOM on the plain listener, for legacy modalities only.
    Plain,
}

impl Transport {
    /// The CLI / storage name.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Mtls => "mtls",
            Transport::Plain => "plain",
        }
    }
}

impl FromStr for Transport {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "tls" => Ok(Transport::Tls),
            "mtls" => Ok(Transport::Mtls),
            "plain" => Ok(Transport::Plain),
            _ => Err(ModelError::UnknownTransport(s.to_owned())),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_lists() {
        let set = PermissionSet::parse_list("store, echo").ok();
        assert_eq!(set.map(|s| s.to_string()), Some("echo,store".to_owned()));
        assert!(set.is_some_and(|s| !s.allows(Permission::Find)));
        assert!(PermissionSet::parse_list("").is_err());
        assert!(PermissionSet::parse_list("echo,delete").is_err());
    }
}
