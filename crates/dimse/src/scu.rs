//! Storage SCU: outbound associations that send C-STORE-RQs (PS3.7 §9.1.1,
//! PS3.4 Annex B), used for C-MOVE sub-operations (PS3.4 C.4.2.2) towards a
//! registered destination device over its own transport.
//!
//! - `tls` / `mtls` destinations: TLS trusting only Bastion's CA, presenting
//!   Bastion's server certificate (which carries clientAuth);
//! - `plain` destinations: unencrypted, as registered.
//!
//! Every socket gets TCP_NODELAY. Data is fragmented to the destination's
//! announced maximum PDU length (PS3.8 D.1; 0 means unlimited, capped here).

use std::{sync::Arc, time::Duration};

use bastion_model::{AeTitle, Transport};
use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::{
    association::client::{AsyncClientAssociation, AsyncTlsStream, ClientAssociationOptions},
    pdu::{PDataValueType, Pdu, PresentationContextResultReason},
};
use tokio::net::TcpStream;

use crate::command;

/// Where to send.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The destination's AE title (Called AE Title).
    pub ae: AeTitle,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// How to connect.
    pub transport: Transport,
}

/// Why a Storage SCU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// The association could not be established (refused, unreachable,
    /// TLS failure).
    #[error("cannot associate with {ae} at {host}:{port}: {reason}")]
    Associate {
        /// Destination AE title.
        ae: String,
        /// Destination host.
        host: String,
        /// Destination port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// No accepted presentation context for this SOP class and transfer
    /// syntax.
    #[error("destination accepted no presentation context for {sop_class} in {transfer_syntax}")]
    NoContext {
        /// SOP Class UID.
        sop_class: String,
        /// Transfer syntax UID.
        transfer_syntax: String,
    },
    /// The association broke or the peer answered something unexpected.
    #[error("C-STORE exchange failed: {0}")]
    Protocol(String),
}

/// One C-STORE to perform.
#[derive(Debug, Clone, Copy)]
pub struct StoreRequest<'a> {
    /// (0000,0002) Affected SOP Class UID.
    pub sop_class: &'a str,
    /// (0000,1000) Affected SOP Instance UID.
    pub sop_instance: &'a str,
    /// Transfer syntax the dataset bytes are encoded in.
    pub transfer_syntax: &'a str,
    /// Dataset bytes (no preamble or meta).
    pub dataset: &'a [u8],
    /// (0000,1030)/(0000,1031) Move Originator AE Title and Message ID.
    pub move_originator: Option<(&'a str, u16)>,
}

enum Link {
    Plain(Box<AsyncClientAssociation<TcpStream>>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

impl Link {
    /// The association's stream, for writing P-DATA-TF directly
    /// ([`crate::pdata`]).
    fn stream(&mut self) -> &mut (dyn tokio::io::AsyncWrite + Unpin + Send) {
        match self {
            Link::Plain(a) => a.inner_stream(),
            Link::Tls(a) => a.inner_stream(),
        }
    }
}

/// An established association to a Storage SCP.
pub struct StoreScu {
    link: Link,
    message_id: u16,
    max_data: usize,
    /// Longest one C-STORE-RQ may take to write.
    timeout: Duration,
}

/// Largest data fragment sent when the peer states no limit.
const MAX_FRAGMENT: usize = 64 * 1024;

impl StoreScu {
    /// Associates with `dest`, proposing one presentation context per
    /// (SOP class, transfer syntax) pair in `contexts` (PS3.8 §9.3.2.2).
    ///
    /// # Errors
    /// [`ScuError::Associate`] when refused, unreachable, or TLS fails.
    pub async fn connect(
        our_ae: &AeTitle,
        dest: &Destination,
        contexts: &[(String, String)],
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<StoreScu, ScuError> {
        let fail = |reason: String| ScuError::Associate {
            ae: dest.ae.to_string(),
            host: dest.host.clone(),
            port: dest.port,
            reason,
        };
        let mut opts = ClientAssociationOptions::new()
            .calling_ae_title(our_ae.as_str().to_owned())
            .called_ae_title(dest.ae.as_str().to_owned())
            .read_timeout(timeout)
            .write_timeout(timeout)
            .connection_timeout(timeout);
        for (sop_class, ts) in contexts {
            opts = opts.with_presentation_context(sop_class.clone(), vec![ts.clone()]);
        }
        let addr = (dest.host.as_str(), dest.port);
        let link = match dest.transport {
            Transport::Plain => {
                let mut a = opts
                    .establish_async(addr)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let _ = a.inner_stream().set_nodelay(true);
                Link::Plain(Box::new(a))
            }
            Transport::Tls | Transport::Mtls => {
                let cfg = tls.ok_or_else(|| fail("no TLS configuration".into()))?;
                let mut a = opts
                    .tls_config(cfg)
                    .server_name(&dest.host)
                    .establish_tls_async(addr)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let _ = a.inner_stream().get_ref().0.set_nodelay(true);
                Link::Tls(Box::new(a))
            }
        };
        let peer_max = match &link {
            Link::Plain(a) => a.acceptor_max_pdu_length(),
            Link::Tls(a) => a.acceptor_max_pdu_length(),
        } as usize;
        // A PDV item costs 6 bytes of the PDU's variable field (PS3.8 §9.3.5).
        let max_data = if peer_max == 0 {
            MAX_FRAGMENT
        } else {
            peer_max.saturating_sub(6).clamp(256, MAX_FRAGMENT)
        };
        Ok(StoreScu {
            link,
            message_id: 0,
            max_data,
            timeout,
        })
    }

    /// Whether the destination accepted a presentation context for this SOP
    /// class in this transfer syntax.
    pub fn accepts(&self, sop_class: &str, ts: &str) -> bool {
        self.context_for(sop_class, ts).is_some()
    }

    /// The presentation context accepted for this SOP class and transfer
    /// syntax, if any.
    fn context_for(&self, sop_class: &str, ts: &str) -> Option<u8> {
        let pcs = match &self.link {
            Link::Plain(a) => a.presentation_contexts(),
            Link::Tls(a) => a.presentation_contexts(),
        };
        pcs.iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == sop_class
                    && pc.transfer_syntax.trim_end_matches('\0') == ts
            })
            .map(|pc| pc.id)
    }

    async fn receive(&mut self) -> Result<Pdu, ScuError> {
        let r = match &mut self.link {
            Link::Plain(a) => a.receive().await,
            Link::Tls(a) => a.receive().await,
        };
        r.map_err(|e| ScuError::Protocol(e.to_string()))
    }

    /// Sends one C-STORE-RQ with its dataset and waits for the C-STORE-RSP.
    /// Returns the response status code (0x0000, a warning 0xB000/0x0001,
    /// or a failure).
    ///
    /// # Errors
    /// [`ScuError::NoContext`] when no context fits (nothing was sent);
    /// [`ScuError::Protocol`] when the association fails.
    pub async fn store(&mut self, req: StoreRequest<'_>) -> Result<u16, ScuError> {
        let (pc, cmd) = self.prepare(&req)?;
        let (max, timeout) = (self.max_data, self.timeout);
        let written = crate::pdata::write_message(
            self.link.stream(),
            pc,
            &cmd,
            Some(req.dataset),
            max,
            timeout,
        )
        .await;
        written.map_err(|e| ScuError::Protocol(e.to_string()))?;
        self.store_response().await
    }

    /// [`StoreScu::store`] for a dataset of `len` bytes arriving in
    /// `pieces` (a large stored instance read one blob segment at a time;
    /// `req.dataset` is ignored).
    ///
    /// # Errors
    /// As [`StoreScu::store`]; a piece that is an error (the instance could
    /// not be read) is [`ScuError::Protocol`]: the message was cut short and
    /// the association is unusable.
    pub(crate) async fn store_streamed(
        &mut self,
        req: StoreRequest<'_>,
        len: u64,
        pieces: &mut tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<u16, ScuError> {
        let (pc, cmd) = self.prepare(&req)?;
        let (max, timeout) = (self.max_data, self.timeout);
        crate::pdata::write_streamed(self.link.stream(), pc, &cmd, len, pieces, max, timeout)
            .await
            .map_err(|e| ScuError::Protocol(e.to_string()))?;
        self.store_response().await
    }

    /// The presentation context and C-STORE-RQ command of `req`.
    fn prepare(&mut self, req: &StoreRequest<'_>) -> Result<(u8, Vec<u8>), ScuError> {
        let pc = self
            .context_for(req.sop_class, req.transfer_syntax)
            .ok_or_else(|| ScuError::NoContext {
                sop_class: req.sop_class.to_owned(),
                transfer_syntax: req.transfer_syntax.to_owned(),
            })?;
        self.message_id = self.message_id.wrapping_add(1).max(1);
        Ok((pc, encode_store_rq(self.message_id, req)))
    }

    /// Waits for the C-STORE-RSP of the last C-STORE-RQ.
    async fn store_response(&mut self) -> Result<u16, ScuError> {
        let mut rsp = Vec::new();
        loop {
            match self.receive().await? {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != PDataValueType::Command {
                            return Err(ScuError::Protocol("dataset in a C-STORE-RSP".into()));
                        }
                        rsp.extend_from_slice(&pdv.data);
                        if rsp.len() > command::MAX_COMMAND_BYTES {
                            return Err(ScuError::Protocol("oversized C-STORE-RSP".into()));
                        }
                        if pdv.is_last {
                            return decode_store_rsp(&rsp, self.message_id);
                        }
                    }
                }
                Pdu::AbortRQ { source } => {
                    return Err(ScuError::Protocol(format!(
                        "destination aborted: {source:?}"
                    )))
                }
                other => {
                    return Err(ScuError::Protocol(format!(
                        "unexpected {}",
                        other.short_description()
                    )))
                }
            }
        }
    }

    /// Releases the association (A-RELEASE, PS3.8 §7.2).
    pub async fn release(self) {
        let _ = match self.link {
            Link::Plain(a) => a.release().await,
            Link::Tls(a) => a.release().await,
        };
    }
}

fn pad(uid: &str) -> String {
    if uid.len() % 2 == 1 {
        format!("{uid}\0")
    } else {
        uid.to_owned()
    }
}

/// C-STORE-RQ command set (PS3.7 §9.3.1.1); also used for C-GET sub-operations.
pub(crate) fn encode_store_rq(message_id: u16, req: &StoreRequest<'_>) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(pad(req.sop_class)),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [command::field::C_STORE_RQ]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(pad(req.sop_instance)),
        ),
    ];
    if let Some((ae, id)) = req.move_originator {
        let ae = if ae.len() % 2 == 1 {
            format!("{ae} ")
        } else {
            ae.to_owned()
        };
        elements.push(DataElement::new(
            tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE,
            VR::AE,
            PrimitiveValue::from(ae),
        ));
        elements.push(DataElement::new(
            tags::MOVE_ORIGINATOR_MESSAGE_ID,
            VR::US,
            dicom_value!(U16, [id]),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    if let Err(e) = obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased()) {
        tracing::error!(error = %e, "cannot encode a C-STORE-RQ");
    }
    out
}

fn decode_store_rsp(bytes: &[u8], message_id: u16) -> Result<u16, ScuError> {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| ScuError::Protocol(format!("undecodable C-STORE-RSP: {e}")))?;
    let field = obj
        .get(tags::COMMAND_FIELD)
        .and_then(|e| e.to_int::<u16>().ok());
    if field != Some(command::field::C_STORE_RSP) {
        return Err(ScuError::Protocol(format!(
            "expected a C-STORE-RSP, got command field {field:?}"
        )));
    }
    let responding_to = obj
        .get(tags::MESSAGE_ID_BEING_RESPONDED_TO)
        .and_then(|e| e.to_int::<u16>().ok());
    if responding_to != Some(message_id) {
        return Err(ScuError::Protocol(
            "C-STORE-RSP answers another message".into(),
        ));
    }
    obj.get(tags::STATUS)
        .and_then(|e| e.to_int::<u16>().ok())
        .ok_or_else(|| ScuError::Protocol("C-STORE-RSP without a Status".into()))
}
