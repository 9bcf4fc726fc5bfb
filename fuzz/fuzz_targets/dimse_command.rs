//! The DIMSE command set decoder (`crates/dimse/src/command.rs`, PS3.7 §6.3.1
//! and Annex E: group 0000, Implicit VR Little Endian), as the server calls it
//! on a reassembled command. A decoded request is re-encoded as the response
//! the server would build, which must decode again.
#![no_main]

use bastion_dimse::command::{self, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = command::decode(data) else {
        return;
    };
    let _ = request.has_dataset();
    if let Request::CEcho {
        message_id,
        sop_class,
    } = request
    {
        let rsp = Response {
            command_field: command::field::C_ECHO_RSP,
            message_id,
            sop_class,
            sop_instance: None,
            status: bastion_dimse::status::Status::SUCCESS,
            error_comment: None,
            offending_elements: Vec::new(),
            dataset_follows: false,
            sub_operations: None,
        };
        let bytes = command::encode(&rsp);
        // A response is not a request, so it decodes as "other".
        assert!(matches!(
            command::decode(&bytes),
            Ok(Request::Other { command_field, .. }) if command_field == command::field::C_ECHO_RSP
        ));
    }
});
