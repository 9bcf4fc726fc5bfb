//! The DIMSE service provider: listeners, association policy, C-ECHO and
//! C-STORE SCP (PS3.7 §9.1.1, §9.1.5; PS3.4 Annexes A and B).
//!
//! Flow of one connection: TCP accept (TCP_NODELAY) → TLS handshake on the
//! TLS listener (client certificate recorded, see [`crate::tls`]) →
//! A-ASSOCIATE-RQ → [`ConnectionPolicy`] applies
//! [`bastion_security::policy::decide`] with the peer address, listener and
//! certificate (A-ASSOCIATE-RJ 1/1/3 or 1/1/7 on refusal) → P-DATA loop:
//! command and dataset fragments are assembled per message, each request is
//! checked against the device's permissions (0x0124 when missing), C-STORE
//! datasets go to the archive's ingest pipeline and the C-STORE-RSP is sent
//! only after the instance is durable and indexed. A C-FIND runs on a
//! blocking thread ([`bastion_archive::Archive::find`]) whose responses reach
//! the loop through a bounded channel; the loop keeps reading PDUs meanwhile,
//! so a C-CANCEL-RQ stops the find before its next pending response.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bastion_archive::{
    query::{self, FindOptions, FindResponse, Model, Query},
    Archive, ArchiveError, Ingested, Origin, Received,
};
use bastion_model::{AeTitle, Permission};
use bastion_security::{
    db::SecurityDb,
    devices::{Device, DeviceRegistry, OnConflict},
    events::Outcome,
    policy::{self, AssociationAttempt, Listener, PeerCertificate},
};
use dicom_ul::{
    association::{
        server::{AccessControl, AsyncServerAssociation, Negotiation, ServerAssociationOptions},
        Association,
    },
    pdu::{
        AbortRQServiceProviderReason, AbortRQSource, AssociationRJServiceUserReason, PDataValue,
        PDataValueType, Pdu, PresentationContextResultReason, UserIdentity,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};

use crate::{
    command::{self, field, Request, Response},
    status::{self, Status},
    tls::{CertSlot, TlsIdentity},
};

/// Settings of the DIMSE front end (all configurable in `bastion.toml`).
#[derive(Debug, Clone)]
pub struct DimseConfig {
    /// Our AE title (PS3.8 §9.3.2 Called AE Title must equal it).
    pub ae_title: AeTitle,
    /// Maximum PDU length we announce and accept (PS3.8 D.1), bytes.
    pub max_pdu_length: u32,
    /// Associations served at once across both listeners (counted once the
    /// policy accepted them; more get A-ASSOCIATE-RJ 1/1/1).
    pub max_associations: usize,
    /// Connections from one source address allowed in the TLS handshake /
    /// A-ASSOCIATE-RQ phase at once; more are closed at once.
    pub max_pending_per_address: usize,
    /// An association silent for this long is aborted.
    pub idle_timeout: Duration,
    /// Time allowed for the TLS handshake plus the A-ASSOCIATE-RQ.
    pub handshake_timeout: Duration,
    /// Largest dataset accepted in one C-STORE, bytes (larger: 0xA700).
    pub max_dataset_bytes: u64,
}

/// The DIMSE front end. Share with `Arc`; one instance serves every
/// listener.
pub struct Dimse {
    archive: Arc<Archive>,
    security: Arc<SecurityDb>,
    config: DimseConfig,
    tls: Option<TlsIdentity>,
    /// Established associations (accepted by the policy).
    active: AtomicUsize,
    /// Connections per source address still in the handshake phase.
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl Dimse {
    /// Assembles the front end. `tls` is required to serve a TLS listener.
    pub fn new(
        archive: Arc<Archive>,
        security: Arc<SecurityDb>,
        config: DimseConfig,
        tls: Option<TlsIdentity>,
    ) -> Dimse {
        Dimse {
            archive,
            security,
            config,
            tls,
            active: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Serves `listener` until `shutdown` turns true, then stops accepting
    /// and waits (at most 30 s) for open associations: a C-STORE in flight
    /// completes and is acknowledged, or is not acknowledged at all.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let me = self.clone();
                        let sd = shutdown.clone();
                        tasks.spawn(async move { me.handle(socket, peer, kind, sd).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .is_err()
        {
            tracing::warn!("associations still open after 30 s of shutdown; closing them");
        }
    }

    async fn handle(
        self: Arc<Self>,
        socket: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        shutdown: watch::Receiver<bool>,
    ) {
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        // Connections still in the TLS handshake / A-ASSOCIATE-RQ phase are
        // capped per source address, so one host cannot starve others; only
        // associations the policy accepted count against max_associations.
        let Some(_pending) = PendingGuard::enter(
            &self.pending,
            peer.ip(),
            self.config.max_pending_per_address,
        ) else {
            tracing::warn!(%peer, "connection dropped: too many unfinished handshakes from this address");
            return;
        };
        let cert_slot: CertSlot = Arc::new(Mutex::new(None));
        let accepted: Decision = Arc::new(Mutex::new(None));
        let policy = ConnectionPolicy {
            dimse: self.clone(),
            peer: peer.ip(),
            listener: kind,
            cert_slot: cert_slot.clone(),
            accepted: accepted.clone(),
        };
        let options = ServerAssociationOptions::new()
            .ae_access_control(policy)
            .ae_title(self.config.ae_title.as_str().to_owned())
            // Any abstract syntax is accepted at negotiation; each request is
            // then checked (permissions, SOP class) and answered with the
            // standard status. This accepts private Storage SOP classes.
            .promiscuous(true)
            .with_negotiation(QueryNegotiation)
            .strict(true)
            .max_pdu_length(self.config.max_pdu_length)
            .read_timeout(self.config.idle_timeout)
            .write_timeout(self.config.idle_timeout);
        let listener_name = match kind {
            Listener::Tls => "tls",
            Listener::Plain => "plain",
        };
        match kind {
            Listener::Tls => {
                let Some(tls) = &self.tls else {
                    tracing::error!("TLS listener without a TLS identity");
                    return;
                };
                let cfg = match tls.config_for_connection(cert_slot) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the TLS configuration");
                        return;
                    }
                };
                let options = options.tls_config(cfg);
                let established = tokio::time::timeout(
                    self.config.handshake_timeout,
                    options.establish_tls_async(socket),
                )
                .await;
                drop(_pending);
                let _active = self.active_guard(&accepted);
                match established {
                    Ok(Ok(assoc)) => {
                        self.run(assoc, peer, &accepted, listener_name, shutdown)
                            .await
                    }
                    Ok(Err(dicom_ul::association::Error::Rejected { .. })) => {} // logged and recorded by the policy
                    Ok(Err(e)) => self.establish_failed(peer, listener_name, &error_chain(&e)),
                    Err(_) => self.establish_failed(
                        peer,
                        listener_name,
                        "TLS handshake or A-ASSOCIATE-RQ timed out",
                    ),
                }
            }
            Listener::Plain => {
                let established = tokio::time::timeout(
                    self.config.handshake_timeout,
                    options.establish_async(socket),
                )
                .await;
                drop(_pending);
                let _active = self.active_guard(&accepted);
                match established {
                    Ok(Ok(assoc)) => {
                        self.run(assoc, peer, &accepted, listener_name, shutdown)
                            .await
                    }
                    Ok(Err(dicom_ul::association::Error::Rejected { .. })) => {} // logged and recorded by the policy
                    Ok(Err(e)) => self.establish_failed(peer, listener_name, &error_chain(&e)),
                    Err(_) => {
                        self.establish_failed(peer, listener_name, "A-ASSOCIATE-RQ timed out")
                    }
                }
            }
        }
    }

    /// Releases the association slot taken by the policy when the
    /// association ends (whether or not the A-ASSOCIATE-AC reached the peer).
    fn active_guard(&self, accepted: &Decision) -> Option<ActiveGuard<'_>> {
        accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
            .then(|| ActiveGuard(&self.active))
    }

    fn establish_failed(&self, peer: SocketAddr, listener: &str, reason: &str) {
        tracing::warn!(%peer, listener, reason, "association not established");
        self.archive.events().record(
            "association.failed",
            Outcome::Failure,
            serde_json::json!({"peer": peer.to_string(), "listener": listener, "reason": clip(reason, 200)}),
        );
    }

    async fn run<S>(
        &self,
        mut assoc: AsyncServerAssociation<S>,
        peer: SocketAddr,
        accepted: &Decision,
        listener: &str,
        mut shutdown: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some((device, certificate)) =
            accepted.lock().unwrap_or_else(|p| p.into_inner()).clone()
        else {
            tracing::error!(%peer, "association established without a policy decision; aborting");
            let _ = assoc.abort().await;
            return;
        };
        let ae = device.ae.to_string();
        tracing::info!(%peer, ae = %ae, listener, "association accepted");
        self.archive.events().record(
            "association.accepted",
            Outcome::Success,
            serde_json::json!({
                "ae": ae, "peer": peer.to_string(), "listener": listener, "transport": device.transport.name(),
                "certificate_sha256": certificate.as_ref().map(|c| c.sha256.clone()),
            }),
        );
        let mut session = Session {
            device,
            peer,
            command: Vec::new(),
            dataset: Vec::new(),
            pending: None,
            overflow: false,
            find: None,
        };
        let end = loop {
            // While a C-FIND runs (on a blocking thread), its responses arrive on a
            // channel; the loop keeps reading PDUs so that a C-CANCEL-RQ is seen
            // between two pending responses. `receive` is cancel-safe (buffered).
            let pdu = tokio::select! {
                // PDUs first: a C-CANCEL already received stops the find before
                // its next response.
                biased;
                r = assoc.receive() => r,
                msg = next_find_message(&mut session.find) => {
                    match self.on_find_message(&mut assoc, &mut session, msg).await {
                        Ok(()) => continue,
                        Err(reason) => break End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified, reason.into()),
                    }
                }
                _ = shutdown.changed() => break End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified, "server shutting down".into()),
            };
            match pdu {
                Ok(Pdu::PData { data }) => {
                    match self.on_pdata(&mut assoc, &mut session, data).await {
                        Ok(()) => {}
                        Err(reason) => {
                            break End::Abort(
                                AbortRQServiceProviderReason::UnexpectedPdu,
                                reason.into(),
                            )
                        }
                    }
                }
                Ok(Pdu::ReleaseRQ) => {
                    let _ = assoc.send(&Pdu::ReleaseRP).await;
                    break End::Released;
                }
                Ok(Pdu::AbortRQ { .. }) => break End::PeerAborted,
                Ok(Pdu::AssociationRQ(_)) => {
                    break End::Abort(
                        AbortRQServiceProviderReason::UnexpectedPdu,
                        "unexpected A-ASSOCIATE-RQ inside an association".into(),
                    )
                }
                Ok(Pdu::Unknown { pdu_type, .. }) => {
                    break End::Abort(
                        AbortRQServiceProviderReason::UnrecognizedPdu,
                        format!("unrecognized PDU type 0x{pdu_type:02X}"),
                    )
                }
                Ok(other) => {
                    break End::Abort(
                        AbortRQServiceProviderReason::UnexpectedPdu,
                        format!("unexpected PDU {}", other.short_description()),
                    )
                }
                Err(e) => {
                    let msg = error_chain(&e);
                    // PS3.8 D.1: a PDU longer than our announced maximum is an
                    // invalid PDU parameter (A-ABORT source 2, reason 6).
                    let code = if msg.contains("too large")
                        || msg.contains("exceeds")
                        || msg.contains("max")
                    {
                        AbortRQServiceProviderReason::InvalidPduParameter
                    } else {
                        AbortRQServiceProviderReason::ReasonNotSpecified
                    };
                    break End::Abort(code, msg);
                }
            }
        };
        if let Some(f) = session.find.take() {
            f.cancel.store(true, Ordering::Relaxed);
        }
        match end {
            End::Released => tracing::info!(%peer, ae = %ae, "association released"),
            End::PeerAborted => tracing::info!(%peer, ae = %ae, "association aborted by the peer"),
            End::Abort(code, reason) => self.abort(assoc, peer, &ae, code, &reason).await,
        }
    }

    async fn abort<S>(
        &self,
        mut assoc: AsyncServerAssociation<S>,
        peer: SocketAddr,
        ae: &str,
        code: AbortRQServiceProviderReason,
        reason: &str,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        tracing::warn!(%peer, ae, reason, "aborting association");
        self.archive.events().record(
            "association.aborted",
            Outcome::Failure,
            serde_json::json!({"ae": ae, "peer": peer.to_string(), "reason": clip(reason, 200)}),
        );
        // PS3.8 §9.3.8: A-ABORT source 2 (service provider).
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(code),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), assoc.send(&abort)).await;
    }

    async fn on_pdata<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        data: Vec<PDataValue>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        for pdv in data {
            match pdv.value_type {
                PDataValueType::Command => {
                    if s.pending.is_some() {
                        return Err("command fragment while a dataset was expected");
                    }
                    if s.command.len() + pdv.data.len() > command::MAX_COMMAND_BYTES {
                        return Err("command set too large");
                    }
                    s.command.extend_from_slice(&pdv.data);
                    if !pdv.is_last {
                        continue;
                    }
                    let bytes = std::mem::take(&mut s.command);
                    let request = match command::decode(&bytes) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(peer = %s.peer, ae = %s.device.ae, error = %e, "undecodable DIMSE command");
                            return Err("undecodable DIMSE command");
                        }
                    };
                    if request.has_dataset() {
                        s.pending = Some((pdv.presentation_context_id, request));
                        s.overflow = false;
                    } else {
                        self.dispatch(assoc, s, pdv.presentation_context_id, request, None)
                            .await?;
                    }
                }
                PDataValueType::Data => {
                    let Some((pc_id, _)) = &s.pending else {
                        return Err("dataset fragment without a command");
                    };
                    if *pc_id != pdv.presentation_context_id {
                        return Err("dataset fragment on another presentation context");
                    }
                    if s.overflow
                        || (s.dataset.len() + pdv.data.len()) as u64 > self.config.max_dataset_bytes
                    {
                        // Keep reading (and discarding) so the peer gets a
                        // status instead of a broken association.
                        s.overflow = true;
                        s.dataset = Vec::new();
                    } else {
                        s.dataset.extend_from_slice(&pdv.data);
                    }
                    if pdv.is_last {
                        let Some((pc_id, request)) = s.pending.take() else {
                            continue;
                        };
                        let dataset = std::mem::take(&mut s.dataset);
                        let dataset = if s.overflow { None } else { Some(dataset) };
                        let overflow = s.overflow;
                        s.overflow = false;
                        if overflow {
                            self.respond(
                                assoc,
                                pc_id,
                                &request,
                                Status::OUT_OF_RESOURCES,
                                Some(format!(
                                    "dataset exceeds the configured limit of {} bytes",
                                    self.config.max_dataset_bytes
                                )),
                            )
                            .await?;
                        } else {
                            self.dispatch(assoc, s, pc_id, request, dataset).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn dispatch<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        pc_id: u8,
        request: Request,
        dataset: Option<Vec<u8>>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let pc = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| pc.transfer_syntax.clone());
        let Some(transfer_syntax) = pc else {
            return Err("message on a presentation context that was not accepted");
        };
        if let Request::CCancel {
            message_id_being_responded_to,
        } = request
        {
            // PS3.7 §9.3.2.3: no response to a C-CANCEL; a cancel for an operation
            // that is not running is ignored.
            if let Some(f) = &s.find {
                if f.message_id == message_id_being_responded_to {
                    f.cancel.store(true, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        if s.find.is_some() {
            // Asynchronous operations are not negotiated (PS3.7 §D.3.3.3): one
            // operation at a time.
            return Err(
                "request while a C-FIND is in progress (asynchronous operations not negotiated)",
            );
        }
        let needed = match &request {
            Request::CEcho { .. } => Permission::Echo,
            Request::CStore { .. } => Permission::Store,
            Request::CFind { .. } => Permission::Find,
            Request::CCancel { .. } => return Ok(()),
            Request::Other {
                command_field: field::C_FIND_RQ,
                ..
            } => Permission::Find,
            Request::Other {
                command_field: field::C_MOVE_RQ,
                ..
            } => Permission::Move,
            Request::Other {
                command_field: field::C_GET_RQ,
                ..
            } => Permission::Get,
            Request::Other {
                command_field: field::C_CANCEL_RQ,
                ..
            } => return Ok(()),
            Request::Other { .. } => {
                return self
                    .respond(
                        assoc,
                        pc_id,
                        &request,
                        Status::UNRECOGNIZED_OPERATION,
                        Some("operation not supported".into()),
                    )
                    .await;
            }
        };
        if !s.device.allow.allows(needed) {
            tracing::warn!(peer = %s.peer, ae = %s.device.ae, permission = needed.name(), "request refused: device lacks permission");
            self.archive.events().record(
                "dimse.not_authorized",
                Outcome::Refused,
                serde_json::json!({"ae": s.device.ae.as_str(), "peer": s.peer.to_string(), "permission": needed.name()}),
            );
            return self
                .respond(
                    assoc,
                    pc_id,
                    &request,
                    Status::NOT_AUTHORIZED,
                    Some(format!("device lacks the {} permission", needed.name())),
                )
                .await;
        }
        match request {
            Request::CEcho { .. } => {
                self.respond(assoc, pc_id, &request, Status::SUCCESS, None)
                    .await
            }
            Request::CStore {
                ref sop_class,
                ref sop_instance,
                ..
            } => {
                let received = Received::Network {
                    dataset: dataset.unwrap_or_default(),
                    transfer_syntax,
                    affected_sop_class: sop_class.clone(),
                    affected_sop_instance: sop_instance.clone(),
                };
                let origin = Origin {
                    ae: s.device.ae.to_string(),
                    peer: s.peer.to_string(),
                    on_conflict: match s.device.on_conflict {
                        OnConflict::Refuse => bastion_index::OnConflict::Refuse,
                        OnConflict::Replace => bastion_index::OnConflict::Replace,
                    },
                };
                let archive = self.archive.clone();
                let result = tokio::task::spawn_blocking(move || archive.ingest(received, &origin))
                    .await
                    .unwrap_or_else(|e| {
                        Err(bastion_archive::ArchiveError::Internal(format!(
                            "ingest task failed: {e}"
                        )))
                    });
                let (st, comment) = match &result {
                    Ok(
                        Ingested::Stored { .. }
                        | Ingested::Duplicate { .. }
                        | Ingested::Replaced { .. },
                    ) => (Status::SUCCESS, None),
                    Err(e) => {
                        let (st, comment) = status::for_ingest_error(e);
                        tracing::warn!(peer = %s.peer, ae = %s.device.ae, status = %st, reason = %e, "C-STORE refused");
                        (st, Some(comment))
                    }
                };
                self.respond(assoc, pc_id, &request, st, comment).await
            }
            Request::CFind {
                message_id,
                ref sop_class,
                priority,
            } => {
                self.start_find(
                    assoc,
                    s,
                    pc_id,
                    &request,
                    message_id,
                    sop_class,
                    priority,
                    &transfer_syntax,
                    dataset.unwrap_or_default(),
                )
                .await
            }
            Request::CCancel { .. } => Ok(()),
            Request::Other { .. } => {
                // C-MOVE / C-GET arrive later in issue 3.
                self.respond(
                    assoc,
                    pc_id,
                    &request,
                    Status::UNRECOGNIZED_OPERATION,
                    Some("operation not supported yet".into()),
                )
                .await
            }
        }
    }

    /// Starts a C-FIND (PS3.4 §C.4.1): decodes and parses the identifier (a
    /// failure is answered at once), then runs [`Archive::find`] on a blocking
    /// thread whose responses the association loop sends as they come.
    #[allow(clippy::too_many_arguments)]
    async fn start_find<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        pc_id: u8,
        request: &Request,
        message_id: u16,
        sop_class: &str,
        priority: u16,
        transfer_syntax: &str,
        dataset: Vec<u8>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let uid = sop_class.trim_end_matches(['\0', ' ']);
        let ae = s.device.ae.to_string();
        let peer = s.peer.to_string();
        let Some(model) = Model::for_find_sop_class(uid) else {
            return self
                .respond(
                    assoc,
                    pc_id,
                    request,
                    Status::SOP_CLASS_NOT_SUPPORTED,
                    Some("only Patient Root and Study Root FIND are supported".into()),
                )
                .await;
        };
        let relational = assoc
            .extended_negotiation_for(uid)
            .and_then(|v| v.first().copied())
            == Some(1);
        tracing::debug!(peer = %s.peer, ae = %ae, priority, relational, "C-FIND-RQ");
        let parsed = command::decode_identifier(&dataset, transfer_syntax)
            .map_err(|e| {
                tracing::warn!(peer = %s.peer, ae = %ae, error = %e, "undecodable C-FIND identifier");
                ArchiveError::NotDicom(e.to_string())
            })
            .and_then(|ident| Query::parse(&ident, model, relational));
        let query = match parsed {
            Ok(q) => q,
            Err(e) => {
                let (st, comment, offending) = match &e {
                    ArchiveError::NotDicom(_) => (
                        Status::CANNOT_UNDERSTAND,
                        "identifier cannot be decoded".to_owned(),
                        Vec::new(),
                    ),
                    other => status::for_query_error(other),
                };
                tracing::warn!(peer = %s.peer, ae = %ae, status = %st, reason = %comment, "C-FIND refused");
                self.archive.events().record(
                    "query.find",
                    Outcome::Refused,
                    serde_json::json!({"ae": ae, "peer": peer, "model": model.name(),
                        "status": st.code(), "reason": comment,
                        "offending": offending.iter().map(|t| t.to_string()).collect::<Vec<_>>()}),
                );
                return send_find_rsp(
                    assoc,
                    pc_id,
                    message_id,
                    uid,
                    st,
                    Some(comment),
                    offending,
                    None,
                )
                .await;
            }
        };
        let (tx, rx) = mpsc::channel(FIND_CHANNEL);
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = FindOptions {
            ae,
            peer,
            retrieve_ae: self.config.ae_title.to_string(),
            max_matches: query::configured_max_matches(),
        };
        let archive = self.archive.clone();
        let flag = cancel.clone();
        let ts = transfer_syntax.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut encode_failed = false;
            let mut sink = |r: FindResponse| {
                if flag.load(Ordering::Relaxed) {
                    return false;
                }
                let st = if r.optional_keys_unsupported {
                    Status::PENDING_WARNING
                } else {
                    Status::PENDING
                };
                match command::encode_identifier(&r.identifier, &ts) {
                    Ok(bytes) => {
                        tx.blocking_send(FindMessage::Pending(bytes, st)).is_ok()
                            && !flag.load(Ordering::Relaxed)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a C-FIND response identifier");
                        encode_failed = true;
                        false
                    }
                }
            };
            let result = archive.find(&query, &opts, &mut sink);
            let fin = match result {
                Ok(_) if encode_failed => FindMessage::Final(
                    Status::CANNOT_UNDERSTAND,
                    Some("unable to encode a response; see the archive log".into()),
                    Vec::new(),
                ),
                Ok(sum) if sum.cancelled => FindMessage::Final(Status::CANCEL, None, Vec::new()),
                Ok(_) => FindMessage::Final(Status::SUCCESS, None, Vec::new()),
                Err(e) => {
                    if !matches!(e, ArchiveError::TooManyMatches { .. }) {
                        tracing::error!(error = %e, "C-FIND failed");
                    }
                    let (st, comment, offending) = status::for_query_error(&e);
                    FindMessage::Final(st, Some(comment), offending)
                }
            };
            let _ = tx.blocking_send(fin);
        });
        s.find = Some(RunningFind {
            message_id,
            pc_id,
            sop_class: uid.to_owned(),
            cancel,
            rx,
        });
        Ok(())
    }

    /// Sends one response of the running C-FIND; the final one ends it.
    async fn on_find_message<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        msg: Option<FindMessage>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(f) = &s.find else { return Ok(()) };
        let (pc_id, message_id, sop_class) = (f.pc_id, f.message_id, f.sop_class.clone());
        match msg {
            Some(FindMessage::Pending(bytes, st)) => {
                send_find_rsp(
                    assoc,
                    pc_id,
                    message_id,
                    &sop_class,
                    st,
                    None,
                    Vec::new(),
                    Some(bytes),
                )
                .await
            }
            Some(FindMessage::Final(st, comment, offending)) => {
                s.find = None;
                send_find_rsp(
                    assoc, pc_id, message_id, &sop_class, st, comment, offending, None,
                )
                .await
            }
            None => {
                s.find = None;
                send_find_rsp(
                    assoc,
                    pc_id,
                    message_id,
                    &sop_class,
                    Status::CANNOT_UNDERSTAND,
                    Some("unable to process the query; see the archive log".into()),
                    Vec::new(),
                    None,
                )
                .await
            }
        }
    }

    async fn respond<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        pc_id: u8,
        request: &Request,
        status: Status,
        error_comment: Option<String>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let rsp = match request {
            Request::CEcho {
                message_id,
                sop_class,
            } => Response {
                command_field: field::C_ECHO_RSP,
                message_id: *message_id,
                sop_class: sop_class.clone(),
                sop_instance: None,
                status,
                error_comment,
                offending_elements: Vec::new(),
                dataset_follows: false,
            },
            Request::CStore {
                message_id,
                sop_class,
                sop_instance,
            } => Response {
                command_field: field::C_STORE_RSP,
                message_id: *message_id,
                sop_class: sop_class.clone(),
                sop_instance: Some(sop_instance.clone()),
                status,
                error_comment,
                offending_elements: Vec::new(),
                dataset_follows: false,
            },
            Request::CFind {
                message_id,
                sop_class,
                ..
            } => Response {
                command_field: field::C_FIND_RSP,
                message_id: *message_id,
                sop_class: sop_class.clone(),
                sop_instance: None,
                status,
                error_comment,
                offending_elements: Vec::new(),
                dataset_follows: false,
            },
            // Never answered (PS3.7 §9.3.2.3).
            Request::CCancel { .. } => return Ok(()),
            Request::Other {
                command_field,
                message_id,
                sop_class,
                ..
            } => Response {
                command_field: command_field | 0x8000,
                message_id: *message_id,
                sop_class: sop_class.clone(),
                sop_instance: None,
                status,
                error_comment,
                offending_elements: Vec::new(),
                dataset_follows: false,
            },
        };
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command::encode(&rsp),
            }],
        };
        assoc.send(&pdu).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot send a DIMSE response");
            "cannot send a DIMSE response"
        })
    }
}

/// Sends a C-FIND-RSP (PS3.7 §9.3.2.2) and, for a pending one, its Identifier in
/// P-DATA fragments that fit the peer's maximum PDU length.
#[allow(clippy::too_many_arguments)]
async fn send_find_rsp<S>(
    assoc: &mut AsyncServerAssociation<S>,
    pc_id: u8,
    message_id: u16,
    sop_class: &str,
    status: Status,
    error_comment: Option<String>,
    offending_elements: Vec<dicom_core::Tag>,
    identifier: Option<Vec<u8>>,
) -> Result<(), &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let rsp = Response {
        command_field: field::C_FIND_RSP,
        message_id,
        sop_class: sop_class.to_owned(),
        sop_instance: None,
        status,
        error_comment,
        offending_elements,
        dataset_follows: identifier.is_some(),
    };
    let fail = |e: dicom_ul::association::Error| {
        tracing::warn!(error = %e, "cannot send a C-FIND response");
        "cannot send a C-FIND response"
    };
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command::encode(&rsp),
            }],
        })
        .await
        .map_err(fail)?;
    let Some(bytes) = identifier else {
        return Ok(());
    };
    // PDU variable part = PDV item (4-byte length, context id, header byte) + data.
    let max = assoc.peer_max_pdu_length().clamp(1024, 1 << 24) as usize - 6;
    let mut chunks = bytes.chunks(max).peekable();
    if chunks.peek().is_none() {
        return Err("empty C-FIND identifier");
    }
    while let Some(chunk) = chunks.next() {
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc_id,
                    value_type: PDataValueType::Data,
                    is_last: chunks.peek().is_none(),
                    data: chunk.to_vec(),
                }],
            })
            .await
            .map_err(fail)?;
    }
    Ok(())
}

enum End {
    Released,
    PeerAborted,
    /// Abort with A-ABORT source 2 (service provider) and this reason
    /// (PS3.8 §9.3.8), and the operator-facing explanation.
    Abort(AbortRQServiceProviderReason, String),
}

struct Session {
    device: Device,
    peer: SocketAddr,
    command: Vec<u8>,
    dataset: Vec<u8>,
    pending: Option<(u8, Request)>,
    overflow: bool,
    /// The C-FIND in progress, if any.
    find: Option<RunningFind>,
}

/// A C-FIND running on a blocking thread, streaming its responses.
struct RunningFind {
    message_id: u16,
    pc_id: u8,
    sop_class: String,
    /// Raised by a C-CANCEL-RQ (or the end of the association); the find stops
    /// before its next response.
    cancel: Arc<AtomicBool>,
    rx: mpsc::Receiver<FindMessage>,
}

/// What the find thread sends to the association loop.
enum FindMessage {
    /// A match: the encoded Identifier and its pending status (0xFF00 / 0xFF01).
    Pending(Vec<u8>, Status),
    /// The final status, Error Comment and Offending Elements.
    Final(Status, Option<String>, Vec<dicom_core::Tag>),
}

/// Pending responses buffered between the find thread and the association.
const FIND_CHANNEL: usize = 8;

async fn next_find_message(find: &mut Option<RunningFind>) -> Option<FindMessage> {
    match find {
        Some(f) => f.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// SOP Class Extended Negotiation for the Q/R FIND SOP classes (PS3.4 §C.5.1):
/// relational queries (byte 1) are supported; combined date-time matching, fuzzy
/// semantic PN matching, timezone adjustment and the other options are not.
pub struct QueryNegotiation;

impl Negotiation for QueryNegotiation {
    fn extended_negotiation(&self, sop_class_uid: &str, input: &[u8]) -> Option<Vec<u8>> {
        let uid = sop_class_uid.trim_end_matches(['\0', ' ']);
        Model::for_find_sop_class(uid)?;
        Some(vec![u8::from(input.first() == Some(&1))])
    }
}

/// The policy's decision for one connection: the accepted device and the
/// client certificate it presented.
type Decision = Arc<Mutex<Option<(Device, Option<PeerCertificate>)>>>;

/// Counts one connection in the handshake phase for its source address.
struct PendingGuard<'a> {
    map: &'a Mutex<HashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl<'a> PendingGuard<'a> {
    fn enter(
        map: &'a Mutex<HashMap<IpAddr, usize>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<PendingGuard<'a>> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PendingGuard { map, ip })
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The per-connection access-control hook handed to dicom-ul. dicom-ul
/// gives it only the AE titles, so it carries the peer address, the
/// listener and the recorded client certificate itself, reads the device
/// from the registry (so CLI changes apply to the next association), and
/// records every decision in the event log.
pub struct ConnectionPolicy {
    dimse: Arc<Dimse>,
    peer: IpAddr,
    listener: Listener,
    cert_slot: CertSlot,
    accepted: Decision,
}

impl AccessControl for ConnectionPolicy {
    fn check_access(
        &self,
        _this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let events = self.dimse.archive.events();
        let calling = clip(calling_ae_title.trim(), 16);
        let called = clip(called_ae_title.trim(), 16);
        let device = match AeTitle::parse(calling_ae_title) {
            Ok(ae) => match DeviceRegistry::new(&self.dimse.security).get(&ae) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the device registry; refusing the association");
                    None
                }
            },
            Err(_) => None,
        };
        let cert: Option<PeerCertificate> = self
            .cert_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let attempt = AssociationAttempt {
            our_ae: &self.dimse.config.ae_title,
            called_ae: called_ae_title,
            calling_ae: calling_ae_title,
            peer: self.peer,
            listener: self.listener,
            certificate: cert.as_ref(),
        };
        match policy::decide(&attempt, device.as_ref()) {
            Ok(()) => {
                *self.accepted.lock().unwrap_or_else(|p| p.into_inner()) =
                    device.map(|d| (d, cert.clone()));
                Ok(())
            }
            Err(refusal) => {
                tracing::warn!(
                    peer = %self.peer, calling_ae = %calling, called_ae = %called,
                    reason = refusal.describe(), "association rejected"
                );
                events.record(
                    "association.rejected",
                    Outcome::Refused,
                    serde_json::json!({
                        "calling_ae": calling, "called_ae": called, "peer": self.peer.to_string(),
                        "reason": refusal.code(), "certificate_sha256": cert.as_ref().map(|c| c.sha256.clone()),
                    }),
                );
                Err(if refusal.rejects_called_ae() {
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized
                } else {
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized
                })
            }
        }
    }
}

/// An error with its sources, `outer: inner: innermost`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        msg.push_str(": ");
        msg.push_str(&inner.to_string());
        cur = inner.source();
    }
    msg
}

/// Printable ASCII only, at most `n` characters: peer-supplied text that
/// reaches logs must not forge log lines.
fn clip(s: &str, n: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(n)
        .collect()
}
