//! Integration tests of bastion-security: a real SQLCipher database in a
//! temporary directory, real argon2.

mod accounts;
mod audit;
