//! What a person (a user account or its API token) may do over the web front
//! end: roles and web permissions (DESIGN §2 "users").
//!
//! Device permissions for DIMSE are [`crate::Permission`]; the two sets are
//! distinct on purpose: a device is a machine with a fixed job, a role is a
//! person's job.

use std::{fmt, str::FromStr};

use crate::ModelError;

/// Something a request to the web front end needs permission for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WebPermission {
    /// Search the archive (QIDO-RS, PS3.18 §10.6).
    Query,
    /// Retrieve instances, metadata, frames and renderings (WADO-RS,
    /// PS3.18 §10.4).
    View,
    /// Store instances (STOW-RS, PS3.18 §10.5).
    Upload,
    /// Read the security event log.
    Audit,
    /// Manage users, devices and settings.
    Admin,
    /// Download a whole study as a zip of Part 10 files from the web UI
    /// (recorded as a DICOM "Export" audit event, PS3.15 A.5.3.6): patient
    /// data leaving the archive's control, so narrower than [`Self::View`].
    Export,
}

impl WebPermission {
    /// Every web permission, in canonical order.
    pub const ALL: [WebPermission; 6] = [
        WebPermission::Query,
        WebPermission::View,
        WebPermission::Upload,
        WebPermission::Audit,
        WebPermission::Admin,
        WebPermission::Export,
    ];

    /// The name used in events and messages (`query`, `view`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WebPermission::Query => "query",
            WebPermission::View => "view",
            WebPermission::Upload => "upload",
            WebPermission::Audit => "audit",
            WebPermission::Admin => "admin",
            WebPermission::Export => "export",
        }
    }
}

impl fmt::Display for WebPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role of a user account (DESIGN §2 "users"). Least privilege: each role
/// grants exactly the [`WebPermission`]s its job needs, see [`Role::allows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including user and device management.
    Admin,
    /// Query and view images (read).
    Clinician,
    /// Query, view and upload images.
    Technologist,
    /// The security event log only, no images.
    Auditor,
    /// Reserved for de-identified access; refused everything for now.
    Researcher,
}

impl Role {
    /// Every role, in canonical order.
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Clinician,
        Role::Technologist,
        Role::Auditor,
        Role::Researcher,
    ];

    /// Parses a role name (`admin`, `clinician`, `technologist`, `auditor`,
    /// `researcher`; exact, lower case).
    ///
    /// # Errors
    /// [`ModelError::UnknownRole`] for any other text.
    pub fn parse(s: &str) -> Result<Role, ModelError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ModelError::UnknownRole(crate::clip(s)))
    }

    /// The CLI / storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Technologist => "technologist",
            Role::Auditor => "auditor",
            Role::Researcher => "researcher",
        }
    }

    /// Whether this role grants `p`. An exhaustive `match`: a new role or
    /// permission does not compile until its row is decided here.
    pub fn allows(self, p: WebPermission) -> bool {
        use WebPermission as P;
        match (self, p) {
            (Role::Admin, _) => true,
            (Role::Clinician, P::Query | P::View | P::Export) => true,
            (Role::Clinician, P::Upload | P::Audit | P::Admin) => false,
            // Technologists send and check images; taking a study out of
            // the archive is not part of that job.
            (Role::Technologist, P::Query | P::View | P::Upload) => true,
            (Role::Technologist, P::Audit | P::Admin | P::Export) => false,
            (Role::Auditor, P::Audit) => true,
            (Role::Auditor, P::Query | P::View | P::Upload | P::Admin | P::Export) => false,
            (
                Role::Researcher,
                P::Query | P::View | P::Upload | P::Audit | P::Admin | P::Export,
            ) => false,
        }
    }
}

impl FromStr for Role {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_least_privilege() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Ok(r));
        }
        assert!(Role::parse("Admin").is_err());
        assert!(Role::parse("root").is_err());
        let granted = |r: Role| -> Vec<WebPermission> {
            WebPermission::ALL
                .into_iter()
                .filter(|p| r.allows(*p))
                .collect()
        };
        use WebPermission as P;
        assert_eq!(granted(Role::Admin), P::ALL.to_vec());
        assert_eq!(granted(Role::Clinician), vec![P::Query, P::View, P::Export]);
        assert_eq!(
            granted(Role::Technologist),
            vec![P::Query, P::View, P::Upload]
        );
        assert_eq!(granted(Role::Auditor), vec![P::Audit]);
        assert!(granted(Role::Researcher).is_empty());
    }
}
