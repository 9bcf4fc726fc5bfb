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
//! C-MOVE and C-GET follow the same pattern ([`crate::retrieve`]): their
//! producer reports over a channel, the loop sends the pending responses and,
//! for C-GET, the C-STORE sub-operations on this association, reading their
//! C-STORE-RSPs (and any C-CANCEL-RQ) from the same PDU stream.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bastion_archive::{
    budget::Reservation,
    ingest::budget_err,
    query::{level_name, unique_key, FindOptions, FindResponse, Model, Query, QueryIdentifier},
    spill::{Spill, SpooledData},
    transcode, Archive, ArchiveError, Ingested, Origin, Received,
};
use bastion_model::{AeTitle, Permission};
use bastion_security::{
    admission::{Admission, AdmissionLimits},
    certs::TrustCache,
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
        PDataValueType, Pdu, PresentationContextResultReason, RequestorRoles, UserIdentity,
        UserVariableItem,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Notify},
    task::JoinSet,
};

use crate::{
    command::{self, field, Request, Response, SubOperations},
    retrieve::{self, RetrieveKind, RetrieveMsg, RunningRetrieve, SubOpOutcome},
    scu::Destination,
    status::{self, Status},
    tls::{CertSlot, RejectSlot, TlsIdentity},
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
    /// A-ASSOCIATE-RQ phase at once; a newer one closes the oldest (so a
    /// flood from a device's own address cannot lock the device out).
    pub max_pending_per_address: usize,
    /// Connections in the TLS handshake / A-ASSOCIATE-RQ phase at once over
    /// every address and listener; a newer one closes the oldest of the
    /// address holding the most.
    pub max_pending: usize,
    /// An association silent for this long is aborted.
    pub idle_timeout: Duration,
    /// Time allowed for the TLS handshake plus the A-ASSOCIATE-RQ.
    pub handshake_timeout: Duration,
    /// Largest dataset accepted in one C-STORE, bytes (larger: 0xA700).
    pub max_dataset_bytes: u64,
    /// Most matches a C-FIND may return, and most instances a C-MOVE/C-GET may
    /// resolve (`[query] max_matches`); more → 0xA700 (PS3.4 C.4.1.1.4).
    pub max_matches: usize,
}

/// The DIMSE front end. Share with `Arc`; one instance serves every
/// listener.
pub struct Dimse {
    archive: Arc<Archive>,
    security: Arc<SecurityDb>,
    config: DimseConfig,
    tls: Option<TlsIdentity>,
    /// The certificate revocation list and pinned fingerprints the TLS
    /// handshake checks (refreshed from the security database).
    trust: Arc<TrustCache>,
    /// Established associations (accepted by the policy).
    active: AtomicUsize,
    /// Connections still in the handshake phase, per source address.
    pending: Arc<Admission>,
}

impl Dimse {
    /// Assembles the front end. `tls` is required to serve a TLS listener.
    pub fn new(
        archive: Arc<Archive>,
        security: Arc<SecurityDb>,
        config: DimseConfig,
        tls: Option<TlsIdentity>,
    ) -> Dimse {
        let trust = Arc::new(TrustCache::new(security.clone(), TrustCache::DEFAULT_TTL));
        Dimse {
            archive,
            security,
            tls,
            trust,
            active: AtomicUsize::new(0),
            pending: Admission::new(AdmissionLimits {
                max_total: config.max_pending,
                max_per_address: config.max_pending_per_address,
                max_unproven_per_address: config.max_pending_per_address,
            }),
            config,
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
        // A second handle on the connection: after an A-ASSOCIATE-RJ the
        // transport stays open until the requestor closes it (PS3.8 §9.1.3,
        // ARTIM), so the peer reads the RJ before it sees the connection end.
        let (socket, artim) = match socket.into_std() {
            Ok(std) => {
                let artim = std.try_clone().ok();
                match TcpStream::from_std(std) {
                    Ok(s) => (s, artim),
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot register the connection");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot inspect the connection");
                return;
            }
        };
        // Connections still in the TLS handshake / A-ASSOCIATE-RQ phase are
        // capped per source address and in total; a newcomer closes the
        // oldest unfinished one (of its own address, else of the address
        // holding the most), so neither one host nor many can lock a device
        // out. Only associations the policy accepted count against
        // max_associations.
        let evicted = Arc::new(Notify::new());
        let wake = evicted.clone();
        let _pending = match self
            .pending
            .admit(peer.ip(), Box::new(move || wake.notify_one()))
        {
            Ok(t) => t,
            Err(refusal) => {
                tracing::warn!(%peer, reason = refusal.describe(), "connection dropped");
                return;
            }
        };
        // While the audit trail cannot record, no association is accepted:
        // A-ASSOCIATE-RJ 2/1/1 (transient), so the device retries later.
        if self.archive.events().refuses_unaudited() {
            self.refuse_unaudited(socket, peer, kind).await;
            return;
        }
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
                let rejected: RejectSlot = Arc::new(Mutex::new(None));
                let cfg = match tls.config_for_connection(
                    cert_slot,
                    rejected.clone(),
                    self.trust.clone(),
                ) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the TLS configuration");
                        return;
                    }
                };
                let options = options.tls_config(cfg);
                let established = tokio::select! {
                    r = tokio::time::timeout(
                        self.config.handshake_timeout,
                        options.establish_tls_async(socket),
                    ) => r,
                    () = evicted.notified() => {
                        // A slot the policy may have taken meanwhile is given back.
                        let _slot = self.active_guard(&accepted);
                        return evicted_log(peer);
                    }
                };
                drop(_pending);
                let refusal = rejected.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(r) = refusal {
                    // The handshake failed on the certificate: the peer
                    // never reached the A-ASSOCIATE-RQ parser.
                    self.certificate_refused(peer, &r);
                    return;
                }
                self.after_establish(established, peer, &accepted, listener_name, shutdown, artim)
                    .await;
            }
            Listener::Plain => {
                let established = tokio::select! {
                    r = tokio::time::timeout(
                        self.config.handshake_timeout,
                        options.establish_async(socket),
                    ) => r,
                    () = evicted.notified() => {
                        // A slot the policy may have taken meanwhile is given back.
                        let _slot = self.active_guard(&accepted);
                        return evicted_log(peer);
                    }
                };
                drop(_pending);
                self.after_establish(established, peer, &accepted, listener_name, shutdown, artim)
                    .await;
            }
        }
    }

    /// Answers an association request with A-ASSOCIATE-RJ 2/1/1 (transient)
    /// while the audit trail is not recording ([`crate::unaudited`]), after
    /// the TLS handshake on the TLS listener; logs and records the refusal
    /// (`association.refused_unaudited`, written into the trail's reserve).
    async fn refuse_unaudited(&self, socket: TcpStream, peer: SocketAddr, kind: Listener) {
        let timeout = self.config.handshake_timeout;
        let (listener, titles) = match kind {
            Listener::Tls => {
                let Some(tls) = &self.tls else {
                    return;
                };
                let Ok(cfg) = tls.config_for_connection(
                    Arc::new(Mutex::new(None)),
                    Arc::new(Mutex::new(None)),
                    self.trust.clone(),
                ) else {
                    return;
                };
                let accepted = tokio::time::timeout(
                    timeout,
                    tokio_rustls::TlsAcceptor::from(cfg).accept(socket),
                )
                .await;
                let titles = match accepted {
                    Ok(Ok(stream)) => {
                        crate::unaudited::refuse_transient(stream, timeout, ARTIM_TIMEOUT).await
                    }
                    _ => None,
                };
                ("tls", titles)
            }
            Listener::Plain => (
                "plain",
                crate::unaudited::refuse_transient(socket, timeout, ARTIM_TIMEOUT).await,
            ),
        };
        let (calling, called) = titles.unwrap_or_default();
        tracing::warn!(%peer, listener, calling_ae = %clip(&calling, 16),
            "association refused (A-ASSOCIATE-RJ 2/1/1, transient): the audit trail is not recording");
        self.archive.events().record(
            "association.refused_unaudited",
            Outcome::Refused,
            serde_json::json!({
                "peer": peer.to_string(),
                "listener": listener,
                "calling_ae": clip(&calling, 16),
                "called_ae": clip(&called, 16),
                "result": "A-ASSOCIATE-RJ 2/1/1",
                "reason": "the audit trail is not recording",
            }),
        );
    }

    /// Runs an established association, or logs why establishment failed
    /// (rejections were already logged and recorded by the policy).
    async fn after_establish<S>(
        &self,
        established: Result<
            Result<AsyncServerAssociation<S>, dicom_ul::association::Error>,
            tokio::time::error::Elapsed,
        >,
        peer: SocketAddr,
        accepted: &Decision,
        listener: &str,
        shutdown: watch::Receiver<bool>,
        artim: Option<std::net::TcpStream>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let _active = self.active_guard(accepted);
        match established {
            Ok(Ok(assoc)) => {
                drop(artim);
                self.run(assoc, peer, accepted, listener, shutdown).await
            }
            Ok(Err(dicom_ul::association::Error::Rejected { .. })) => {
                // Logged and recorded by the policy; wait for the requestor
                // to close (bounded), then close our side.
                if let Some(conn) = artim {
                    let _ =
                        tokio::task::spawn_blocking(move || wait_for_close(conn, ARTIM_TIMEOUT))
                            .await;
                }
            }
            Ok(Err(e)) => self.establish_failed(peer, listener, &error_chain(&e)),
            Err(_) => {
                let what = if listener == "tls" {
                    "TLS handshake or A-ASSOCIATE-RQ"
                } else {
                    "A-ASSOCIATE-RQ"
                };
                self.establish_failed(peer, listener, &format!("{what} timed out"));
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

    /// Logs and records a client certificate the TLS handshake refused, with
    /// its reason (the audit trail maps it to a DICOM Security Alert, PS3.15
    /// A.5.3.11, event type Node Authentication).
    fn certificate_refused(&self, peer: SocketAddr, r: &crate::tls::CertRejection) {
        let cn = r.subject_cn.as_deref().map(|c| clip(c, 64));
        tracing::warn!(
            %peer, listener = "tls", reason = r.code, detail = %clip(&r.detail, 300),
            certificate_sha256 = %r.sha256, subject_cn = cn.as_deref().unwrap_or("-"),
            "TLS handshake refused: client certificate rejected"
        );
        self.archive.events().record(
            "association.rejected",
            Outcome::Refused,
            serde_json::json!({
                "peer": peer.to_string(), "listener": "tls", "stage": "tls_handshake",
                "reason": r.code, "detail": clip(&r.detail, 300),
                "certificate_sha256": r.sha256, "subject_cn": cn,
            }),
        );
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
            spill: None,
            pending: None,
            overflow: None,
            reservation: self.archive.budget().transfer(),
            find: None,
            retrieve: None,
            next_store_id: 0,
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
                msg = retrieve::next_message(&mut session.retrieve) => {
                    match self.on_retrieve_message(&mut assoc, &mut session, msg).await {
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
        if let Some(r) = session.retrieve.take() {
            r.cancel.store(true, Ordering::Relaxed);
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
                        s.overflow = None;
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
                    if s.overflow.is_none() {
                        let is_store = matches!(s.pending, Some((_, Request::CStore { .. })));
                        if let Err(comment) = self.receive_fragment(s, &pdv.data, is_store) {
                            // Keep reading (and discarding) so the peer gets a
                            // status instead of a broken association.
                            tracing::warn!(peer = %s.peer, ae = %s.device.ae, reason = %comment, "C-STORE dataset discarded while receiving");
                            s.overflow = Some(comment);
                            s.dataset = Vec::new();
                            s.spill = None;
                            s.reservation.release_all();
                        }
                    }
                    if pdv.is_last {
                        let Some((pc_id, request)) = s.pending.take() else {
                            continue;
                        };
                        let dataset = std::mem::take(&mut s.dataset);
                        let spilled = s.spill.take().map(Spill::finish).transpose();
                        let overflow = s.overflow.take().or_else(|| {
                            spilled
                                .as_ref()
                                .err()
                                .map(|e| status::for_ingest_error(e).1)
                        });
                        if let Some(comment) = overflow {
                            drop(dataset);
                            drop(spilled);
                            s.reservation.release_all();
                            self.archive.events().record(
                                "store.refused",
                                Outcome::Refused,
                                serde_json::json!({"ae": s.device.ae.as_str(), "peer": s.peer.to_string(), "reason": comment}),
                            );
                            self.respond(
                                assoc,
                                pc_id,
                                &request,
                                Status::OUT_OF_RESOURCES,
                                Some(comment),
                            )
                            .await?;
                        } else {
                            let payload = match spilled {
                                Ok(Some(spooled)) => Payload::Spilled(spooled),
                                _ => Payload::Memory(dataset),
                            };
                            let done = self.dispatch(assoc, s, pc_id, request, Some(payload)).await;
                            // The dataset is gone (ingested or answered).
                            s.reservation.release_all();
                            done?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds one fragment of the dataset being received: in memory under the
    /// association's reservation while it fits, then, for a C-STORE, in an
    /// encrypted spill on disk (`bastion_archive::spill`): a dataset larger
    /// than the memory share is stored, not refused. The spill's disk I/O is
    /// one 1 MiB segment write at a time, done inline (no await point).
    ///
    /// # Errors
    /// The Error Comment of the 0xA700 the C-STORE will get.
    fn receive_fragment(
        &self,
        s: &mut Session,
        bytes: &[u8],
        is_store: bool,
    ) -> Result<(), String> {
        let held = s.dataset.len() as u64 + s.spill.as_ref().map_or(0, Spill::len);
        if held + bytes.len() as u64 > self.config.max_dataset_bytes {
            return Err(format!(
                "dataset exceeds the configured limit of {} bytes",
                self.config.max_dataset_bytes
            ));
        }
        if let Some(spill) = s.spill.as_mut() {
            return spill
                .append(bytes)
                .map_err(|e| status::for_ingest_error(&e).1);
        }
        let Err(budget) = s.reservation.extend(&mut s.dataset, bytes) else {
            return Ok(());
        };
        let spill = if is_store {
            self.archive
                .spill()
                .map_err(|e| status::for_ingest_error(&e).1)?
        } else {
            None
        };
        let Some(mut spill) = spill else {
            return Err(budget_err(budget).to_string());
        };
        tracing::debug!(peer = %s.peer, ae = %s.device.ae, held = s.dataset.len(), "C-STORE dataset larger than the memory share: spilled to the encrypted spool");
        let in_memory = std::mem::take(&mut s.dataset);
        s.reservation.release_all();
        spill
            .append(&in_memory)
            .and_then(|()| spill.append(bytes))
            .map_err(|e| status::for_ingest_error(&e).1)?;
        s.spill = Some(spill);
        Ok(())
    }

    async fn dispatch<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        pc_id: u8,
        request: Request,
        dataset: Option<Payload>,
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
            if let Some(r) = &s.retrieve {
                if r.message_id == message_id_being_responded_to {
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        if let Request::CStoreRsp {
            message_id_being_responded_to,
            status,
        } = request
        {
            return self
                .on_get_store_rsp(assoc, s, message_id_being_responded_to, status)
                .await;
        }
        if s.retrieve.is_some() {
            return Err(
                "request while a C-MOVE or C-GET is in progress (asynchronous operations not negotiated)",
            );
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
            Request::CMove { .. } => Permission::Move,
            Request::CGet { .. } => Permission::Get,
            Request::CCancel { .. } | Request::CStoreRsp { .. } => return Ok(()),
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
        // While the audit trail cannot record, nothing that would produce an
        // audit record is served: out of resources (PS3.4 B.2.3, C.4.1.1.4,
        // C.4.2.1.5, C.4.3.1.4), recorded into the trail's reserve.
        let unaudited = match &request {
            Request::CStore { .. } | Request::CFind { .. } => Some(Status::OUT_OF_RESOURCES),
            Request::CMove { .. } => Some(Status::OUT_OF_RESOURCES_MATCHES),
            Request::CGet { .. } => Some(Status::UNABLE_TO_PERFORM_SUBOPERATIONS),
            _ => None,
        };
        if let Some(st) = unaudited.filter(|_| self.archive.events().refuses_unaudited()) {
            tracing::warn!(peer = %s.peer, ae = %s.device.ae, status = %st, "request refused: the audit trail is not recording");
            self.archive.events().record(
                "dimse.refused_unaudited",
                Outcome::Refused,
                serde_json::json!({"ae": s.device.ae.as_str(), "peer": s.peer.to_string(), "permission": needed.name(), "status": st.to_string(), "reason": "the audit trail is not recording"}),
            );
            return self
                .respond(
                    assoc,
                    pc_id,
                    &request,
                    st,
                    Some("audit trail not recording; retry later".into()),
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
                let received = match dataset {
                    Some(Payload::Spilled(dataset)) => Received::SpooledNetwork {
                        dataset,
                        transfer_syntax,
                        affected_sop_class: sop_class.clone(),
                        affected_sop_instance: sop_instance.clone(),
                    },
                    other => Received::Network {
                        dataset: other.map(Payload::into_memory).unwrap_or_default(),
                        transfer_syntax,
                        affected_sop_class: sop_class.clone(),
                        affected_sop_instance: sop_instance.clone(),
                    },
                };
                let origin = Origin {
                    ae: s.device.ae.to_string(),
                    peer: s.peer.to_string(),
                    on_conflict: match s.device.on_conflict {
                        OnConflict::Refuse => bastion_archive::OnConflict::Refuse,
                        OnConflict::Replace => bastion_archive::OnConflict::Replace,
                    },
                };
                let archive = self.archive.clone();
                // The dataset's reservation goes with it into the ingest (which
                // reserves its inflated form there) and is given back after.
                let mut reservation =
                    std::mem::replace(&mut s.reservation, self.archive.budget().transfer());
                let result = tokio::task::spawn_blocking(move || {
                    archive.ingest_reserved(received, &origin, &mut reservation)
                })
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
                    dataset.map(Payload::into_memory).unwrap_or_default(),
                )
                .await
            }
            Request::CMove { .. } | Request::CGet { .. } => {
                self.start_retrieve(
                    assoc,
                    s,
                    pc_id,
                    &request,
                    &transfer_syntax,
                    dataset.map(Payload::into_memory).unwrap_or_default(),
                )
                .await
            }
            Request::CCancel { .. } | Request::CStoreRsp { .. } => Ok(()),
            Request::Other { .. } => {
                self.respond(
                    assoc,
                    pc_id,
                    &request,
                    Status::UNRECOGNIZED_OPERATION,
                    Some("operation not supported".into()),
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
                let (st, comment, offending) = identifier_refusal(&e);
                tracing::warn!(peer = %s.peer, ae = %ae, status = %st, reason = %comment, "C-FIND refused");
                self.archive.events().record_private(
                    "query.find",
                    Outcome::Refused,
                    serde_json::json!({"ae": ae, "peer": peer, "model": model.name(),
                        "status": st.code(), "reason": comment,
                        "offending": offending.iter().map(|t| t.to_string()).collect::<Vec<_>>()}),
                    bastion_security::audit::private_query(&dataset, Some(transfer_syntax)),
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
            max_matches: self.config.max_matches,
            identifier: Some(QueryIdentifier {
                bytes: dataset,
                transfer_syntax: Some(transfer_syntax.to_owned()),
            }),
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

    /// Starts a C-MOVE or C-GET (PS3.4 §C.4.2, §C.4.3). Refusals are answered at
    /// once with no sub-operation: unsupported SOP class (0x0122), Move
    /// Destination unknown or not allowed for this device (0xA801, no outbound
    /// connection), malformed identifier or no unique key at the retrieve level
    /// (0xA900 / 0xC000). Otherwise the producer starts and the association loop
    /// sends the responses as sub-operations finish.
    async fn start_retrieve<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        pc_id: u8,
        request: &Request,
        transfer_syntax: &str,
        dataset: Vec<u8>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (message_id, sop_class, move_destination, priority) = match request {
            Request::CMove {
                message_id,
                sop_class,
                move_destination,
                priority,
            } => (
                *message_id,
                sop_class.as_str(),
                Some(move_destination.as_str()),
                *priority,
            ),
            Request::CGet {
                message_id,
                sop_class,
                priority,
            } => (*message_id, sop_class.as_str(), None, *priority),
            _ => return Ok(()),
        };
        let is_move = move_destination.is_some();
        let event = if is_move {
            "retrieve.move"
        } else {
            "retrieve.get"
        };
        let uid = sop_class.trim_end_matches(['\0', ' ']);
        let ae = s.device.ae.to_string();
        let peer = s.peer.to_string();
        let model = if is_move {
            Model::for_move_sop_class(uid)
        } else {
            Model::for_get_sop_class(uid)
        };
        let Some(model) = model else {
            return self
                .respond(
                    assoc,
                    pc_id,
                    request,
                    Status::SOP_CLASS_NOT_SUPPORTED,
                    Some("only Patient Root and Study Root MOVE/GET are supported".into()),
                )
                .await;
        };
        tracing::debug!(peer = %s.peer, ae = %ae, priority, event, "retrieve request");
        let destination = match move_destination {
            Some(raw) => match self.move_destination(&s.device, raw) {
                Ok(d) => Some(d),
                Err(reason) => {
                    let dest = clip(raw.trim(), 16);
                    tracing::warn!(peer = %s.peer, ae = %ae, destination = %dest, reason, "C-MOVE refused: Move Destination unknown");
                    self.archive.events().record(
                        event,
                        Outcome::Refused,
                        serde_json::json!({"ae": ae, "peer": peer, "destination": dest,
                            "model": model.name(), "status": Status::MOVE_DESTINATION_UNKNOWN.code(),
                            "reason": reason}),
                    );
                    let rsp = retrieve_rsp(
                        true,
                        message_id,
                        uid,
                        Status::MOVE_DESTINATION_UNKNOWN,
                        Some("Move Destination unknown".into()),
                        Vec::new(),
                        None,
                        false,
                    );
                    return send_rsp(assoc, pc_id, rsp, None).await;
                }
            },
            None => None,
        };
        let parsed = command::decode_identifier(&dataset, transfer_syntax)
            .map_err(|e| {
                tracing::warn!(peer = %s.peer, ae = %ae, error = %e, "undecodable retrieve identifier");
                ArchiveError::NotDicom(e.to_string())
            })
            .and_then(|ident| {
                let q = Query::parse(&ident, model, false)?;
                let key = unique_key(q.level());
                let present = ident
                    .get(key)
                    .and_then(|e| e.to_str().ok())
                    .is_some_and(|v| !v.trim_matches(['\0', ' ']).is_empty());
                if !present {
                    return Err(ArchiveError::InvalidQuery {
                        comment: "retrieve: the unique key of the Query/Retrieve Level is required"
                            .into(),
                        offending: vec![key],
                    });
                }
                Ok(q)
            });
        let query = match parsed {
            Ok(q) => q,
            Err(e) => {
                let (st, comment, offending) = identifier_refusal(&e);
                tracing::warn!(peer = %s.peer, ae = %ae, status = %st, reason = %comment, "retrieve refused");
                self.archive.events().record(
                    event,
                    Outcome::Refused,
                    serde_json::json!({"ae": ae, "peer": peer, "model": model.name(),
                        "destination": destination.as_ref().map(|d| d.ae.as_str().to_owned()),
                        "status": st.code(), "reason": comment,
                        "offending": offending.iter().map(|t| t.to_string()).collect::<Vec<_>>()}),
                );
                let rsp = retrieve_rsp(
                    is_move,
                    message_id,
                    uid,
                    st,
                    Some(comment),
                    offending,
                    None,
                    false,
                );
                return send_rsp(assoc, pc_id, rsp, None).await;
            }
        };
        let (tx, rx) = mpsc::channel(retrieve::RETRIEVE_CHANNEL);
        let cancel = Arc::new(AtomicBool::new(false));
        let level = level_name(query.level());
        let max_matches = self.config.max_matches;
        let kind = match destination {
            Some(destination) => {
                let dest_ae = destination.ae.clone();
                let tls_reject: crate::tls::ServerReject = Arc::new(Mutex::new(None));
                tokio::spawn(retrieve::run_move(retrieve::MoveJob {
                    archive: self.archive.clone(),
                    query,
                    max_matches,
                    our_ae: self.config.ae_title.clone(),
                    destination,
                    tls: self
                        .tls
                        .as_ref()
                        .map(|t| t.client_config_reporting(tls_reject.clone())),
                    tls_reject,
                    originator: (ae, message_id),
                    timeout: self.config.idle_timeout.min(Duration::from_secs(30)),
                    cancel: cancel.clone(),
                    tx,
                }));
                RetrieveKind::Move {
                    destination: dest_ae,
                }
            }
            None => {
                retrieve::spawn_get_producer(
                    self.archive.clone(),
                    query,
                    max_matches,
                    cancel.clone(),
                    tx,
                );
                RetrieveKind::Get
            }
        };
        s.retrieve = Some(RunningRetrieve::new(
            kind,
            message_id,
            pc_id,
            uid.to_owned(),
            transfer_syntax.to_owned(),
            model.name(),
            level,
            cancel,
            rx,
        ));
        Ok(())
    }

    /// The registered destination `raw` names, if `device` may move to it and
    /// it has a host and port; otherwise the reason (for the event log only:
    /// the peer always gets "Move Destination unknown").
    fn move_destination(&self, device: &Device, raw: &str) -> Result<Destination, &'static str> {
        let ae = AeTitle::parse(raw).map_err(|_| "not a valid AE title")?;
        let dest = DeviceRegistry::new(&self.security)
            .get(&ae)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read the device registry");
                "device registry unavailable"
            })?
            .ok_or("not a registered device")?;
        if !device.may_move_to(&dest.ae) {
            return Err("destination not allowed for this device");
        }
        let (Some(host), Some(port)) = (dest.host.clone(), dest.port) else {
            return Err("destination has no host and port");
        };
        Ok(Destination {
            ae: dest.ae,
            host,
            port,
            transport: dest.transport,
        })
    }

    /// Handles one message of the running retrieval's producer (`None`: it has
    /// ended, send the final response).
    async fn on_retrieve_message<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        msg: Option<RetrieveMsg>,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(r) = s.retrieve.as_mut() else {
            return Ok(());
        };
        match msg {
            Some(RetrieveMsg::Resolved { uids, studies }) => {
                r.uids = Some(uids);
                r.studies = studies;
                Ok(())
            }
            Some(RetrieveMsg::Refused(st, comment, offending)) => {
                let Some(r) = s.retrieve.take() else {
                    return Ok(());
                };
                tracing::warn!(peer = %s.peer, ae = %s.device.ae, status = %st, reason = %comment, "retrieve refused");
                self.record_retrieve(s, &r, st, Some(&comment));
                let rsp = retrieve_rsp(
                    !r.is_get(),
                    r.message_id,
                    &r.sop_class,
                    st,
                    Some(comment),
                    offending,
                    None,
                    false,
                );
                send_rsp(assoc, r.pc_id, rsp, None).await
            }
            Some(RetrieveMsg::SubOp { uid, outcome }) => {
                r.record(&uid, outcome);
                send_pending(assoc, r).await
            }
            Some(RetrieveMsg::Stopped(reason)) => {
                r.stopped = Some(reason);
                Ok(())
            }
            Some(RetrieveMsg::Instance(Err((uid, reason)))) => {
                tracing::error!(reason, "cannot read a stored instance for C-GET");
                r.record(&uid, SubOpOutcome::Failed);
                send_pending(assoc, r).await
            }
            Some(RetrieveMsg::Instance(Ok(inst))) => {
                // PS3.4 §C.4.3.3, PS3.7 §D.3.3.4: only on a context for this SOP
                // class, in the stored transfer syntax, whose SCP role the
                // requestor proposed and we accepted; otherwise the sub-operation
                // fails (never sent, never waited for).
                let with_role = scp_role_accepted(assoc.user_variables(), &inst.sop_class);
                let offered: Vec<(u8, String)> = assoc
                    .presentation_contexts()
                    .iter()
                    .filter(|pc| {
                        with_role
                            && pc.reason == PresentationContextResultReason::Acceptance
                            && pc.abstract_syntax.trim_end_matches(['\0', ' ']) == inst.sop_class
                    })
                    .map(|pc| {
                        (
                            pc.id,
                            pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_owned(),
                        )
                    })
                    .collect();
                // The stored transfer syntax first; else an uncompressed one we
                // can produce from it (PS3.4 C.4.3.3.1).
                let chosen = offered
                    .iter()
                    .find(|(_, ts)| *ts == inst.transfer_syntax)
                    .map(|(id, _)| (*id, None))
                    .or_else(|| {
                        transcode::FALLBACKS.iter().find_map(|fb| {
                            offered
                                .iter()
                                .find(|(_, ts)| {
                                    ts == fb && transcode::can_transcode(&inst.transfer_syntax, fb)
                                })
                                .map(|(id, ts)| (*id, Some(ts.clone())))
                        })
                    });
                let Some((store_pc, convert_to)) = chosen else {
                    tracing::info!(peer = %s.peer, ae = %s.device.ae, sop_class = %inst.sop_class,
                        transfer_syntax = %inst.transfer_syntax,
                        "C-GET sub-operation failed: no presentation context with the SCP role for this SOP class in a transfer syntax Bastion can send");
                    r.record(&inst.sop_instance, SubOpOutcome::Failed);
                    return send_pending(assoc, r).await;
                };
                let mut inst = inst;
                if let Some(to) = convert_to {
                    let from = inst.transfer_syntax.clone();
                    let data = std::mem::take(&mut inst.dataset).into_whole().await;
                    let target = to.clone();
                    let converted = match data {
                        Ok(data) => tokio::task::spawn_blocking(move || {
                            transcode::transcode(data.as_slice(), &from, &target)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            Err(ArchiveError::Internal(format!(
                                "transcode task failed: {e}"
                            )))
                        }),
                        Err(e) => Err(ArchiveError::Internal(e)),
                    };
                    match converted {
                        Ok(bytes) => {
                            inst.dataset = crate::retrieve::Dataset::whole(bytes);
                            inst.transfer_syntax = to;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "C-GET sub-operation failed: cannot convert the stored transfer syntax");
                            r.record(&inst.sop_instance, SubOpOutcome::Failed);
                            return send_pending(assoc, r).await;
                        }
                    }
                }
                s.next_store_id = s.next_store_id.wrapping_add(1).max(1);
                let id = s.next_store_id;
                let cmd = crate::scu::encode_store_rq(
                    id,
                    &crate::scu::StoreRequest {
                        sop_class: &inst.sop_class,
                        sop_instance: &inst.sop_instance,
                        transfer_syntax: &inst.transfer_syntax,
                        dataset: &[],
                        move_originator: None,
                    },
                );
                let sent = match &mut inst.dataset {
                    crate::retrieve::Dataset::Streamed { len, rx } => {
                        let max = fragment_len(assoc.peer_max_pdu_length());
                        crate::pdata::write_streamed(
                            assoc.inner_stream(),
                            store_pc,
                            &cmd,
                            *len,
                            rx,
                            max,
                            self.config.idle_timeout,
                        )
                        .await
                    }
                    whole => {
                        send_message(
                            assoc,
                            store_pc,
                            &cmd,
                            Some(whole.as_slice()),
                            self.config.idle_timeout,
                        )
                        .await
                    }
                };
                sent.map_err(|e| {
                    tracing::warn!(error = %e, "cannot send a C-GET sub-operation");
                    "cannot send a C-GET sub-operation"
                })?;
                r.awaiting = Some((id, inst.sop_instance));
                Ok(())
            }
            None => {
                let Some(mut r) = s.retrieve.take() else {
                    return Ok(());
                };
                if r.uids.is_none() {
                    tracing::error!(peer = %s.peer, ae = %s.device.ae, "retrieve task ended without resolving the identifier");
                    let st = Status::CANNOT_UNDERSTAND;
                    self.record_retrieve(s, &r, st, Some("retrieve task failed"));
                    let rsp = retrieve_rsp(
                        !r.is_get(),
                        r.message_id,
                        &r.sop_class,
                        st,
                        Some("unable to process; see the archive log".into()),
                        Vec::new(),
                        None,
                        false,
                    );
                    return send_rsp(assoc, r.pc_id, rsp, None).await;
                }
                let (st, with_remaining) = r.finish();
                let comment = if st == Status::UNABLE_TO_PERFORM_SUBOPERATIONS {
                    Some(if r.stopped.is_some() {
                        "Move Destination unreachable or failed".to_owned()
                    } else {
                        "no sub-operation could be performed".to_owned()
                    })
                } else {
                    None
                };
                let identifier = if st == Status::SUCCESS {
                    None
                } else {
                    match command::encode_failed_list(&r.failed_uids, &r.transfer_syntax) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode the Failed SOP Instance UID List");
                            None
                        }
                    }
                };
                let stopped = r.stopped.clone();
                self.record_retrieve(s, &r, st, stopped.as_deref());
                let counts = r.counts(with_remaining);
                let has_identifier = identifier.is_some();
                let rsp = retrieve_rsp(
                    !r.is_get(),
                    r.message_id,
                    &r.sop_class,
                    st,
                    comment,
                    Vec::new(),
                    Some(counts),
                    has_identifier,
                );
                send_rsp(assoc, r.pc_id, rsp, identifier).await
            }
        }
    }

    /// A C-STORE-RSP from the C-GET requestor for our outstanding sub-operation.
    async fn on_get_store_rsp<S>(
        &self,
        assoc: &mut AsyncServerAssociation<S>,
        s: &mut Session,
        responding_to: u16,
        status: u16,
    ) -> Result<(), &'static str>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(r) = s.retrieve.as_mut() else {
            return Err("C-STORE-RSP while no C-GET is in progress");
        };
        let Some((id, uid)) = r.awaiting.take() else {
            return Err("C-STORE-RSP without an outstanding C-STORE-RQ");
        };
        if id != responding_to {
            return Err("C-STORE-RSP for another message");
        }
        let outcome = SubOpOutcome::of_store_status(status);
        if outcome != SubOpOutcome::Completed {
            tracing::info!(peer = %s.peer, ae = %s.device.ae, status = format!("0x{status:04X}"), "C-GET sub-operation not completed");
        }
        r.record(&uid, outcome);
        send_pending(assoc, r).await
    }

    /// Records the end (or refusal) of a retrieval: device, destination, model,
    /// level, counts, status and the Study Instance UIDs touched (never patient
    /// names or IDs).
    fn record_retrieve(&self, s: &Session, r: &RunningRetrieve, st: Status, reason: Option<&str>) {
        let (event, destination) = match &r.kind {
            RetrieveKind::Move { destination } => {
                ("retrieve.move", Some(destination.as_str().to_owned()))
            }
            RetrieveKind::Get => ("retrieve.get", None),
        };
        let outcome = if st == Status::SUCCESS || st == Status::CANCEL {
            Outcome::Success
        } else if r.uids.is_none() {
            Outcome::Refused
        } else {
            Outcome::Failure
        };
        tracing::info!(peer = %s.peer, ae = %s.device.ae, event, status = %st,
            completed = r.completed, failed = r.failed, warning = r.warning, remaining = r.remaining(),
            "retrieve finished");
        self.archive.events().record(
            event,
            outcome,
            serde_json::json!({
                "ae": s.device.ae.as_str(), "peer": s.peer.to_string(), "destination": destination,
                "model": r.model, "level": r.level, "status": st.code(),
                "cancelled": st == Status::CANCEL,
                "completed": r.completed, "failed": r.failed, "warning": r.warning,
                "remaining": r.remaining(), "studies": r.studies,
                "reason": reason.map(|x| clip(x, 200)),
            }),
        );
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
                sub_operations: None,
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
                sub_operations: None,
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
                sub_operations: None,
            },
            Request::CMove {
                message_id,
                sop_class,
                ..
            }
            | Request::CGet {
                message_id,
                sop_class,
                ..
            } => Response {
                command_field: if matches!(request, Request::CMove { .. }) {
                    field::C_MOVE_RSP
                } else {
                    field::C_GET_RSP
                },
                message_id: *message_id,
                sop_class: sop_class.clone(),
                sop_instance: None,
                status,
                error_comment,
                offending_elements: Vec::new(),
                dataset_follows: false,
                sub_operations: None,
            },
            // Never answered (PS3.7 §9.3.2.3).
            Request::CCancel { .. } | Request::CStoreRsp { .. } => return Ok(()),
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
                sub_operations: None,
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

/// A C-MOVE-RSP or C-GET-RSP (PS3.7 §9.3.4.2, §9.3.3.2).
#[allow(clippy::too_many_arguments)]
fn retrieve_rsp(
    is_move: bool,
    message_id: u16,
    sop_class: &str,
    status: Status,
    error_comment: Option<String>,
    offending_elements: Vec<dicom_core::Tag>,
    sub_operations: Option<SubOperations>,
    dataset_follows: bool,
) -> Response {
    Response {
        command_field: if is_move {
            field::C_MOVE_RSP
        } else {
            field::C_GET_RSP
        },
        message_id,
        sop_class: sop_class.to_owned(),
        sop_instance: None,
        status,
        error_comment,
        offending_elements,
        dataset_follows,
        sub_operations,
    }
}

/// A pending C-MOVE-RSP / C-GET-RSP with the counts, while sub-operations remain
/// (PS3.4 C.4.2.3.1: Remaining + Completed + Failed + Warning = total).
async fn send_pending<S>(
    assoc: &mut AsyncServerAssociation<S>,
    r: &RunningRetrieve,
) -> Result<(), &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if r.remaining() == 0 {
        return Ok(());
    }
    let rsp = retrieve_rsp(
        !r.is_get(),
        r.message_id,
        &r.sop_class,
        Status::PENDING,
        None,
        Vec::new(),
        Some(r.counts(true)),
        false,
    );
    send_rsp(assoc, r.pc_id, rsp, None).await
}

/// Sends a response command and, when given, its dataset in fragments that fit
/// the peer's maximum PDU length.
async fn send_rsp<S>(
    assoc: &mut AsyncServerAssociation<S>,
    pc_id: u8,
    rsp: Response,
    dataset: Option<Vec<u8>>,
) -> Result<(), &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    send_message(
        assoc,
        pc_id,
        &command::encode(&rsp),
        dataset.as_deref(),
        RESPONSE_WRITE_TIMEOUT,
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "cannot send a DIMSE response");
        "cannot send a DIMSE response"
    })
}

/// Longest a DIMSE response may take to write before the association is
/// given up.
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one DIMSE message (command, then the dataset if any), each
/// P-DATA-TF within the peer's maximum PDU length (PS3.8 D.1; a stated 0 is
/// "no limit", then [`MAX_SEND_PDU`] applies), written straight to the stream
/// in as few writes as possible ([`crate::pdata`]).
async fn send_message<S>(
    assoc: &mut AsyncServerAssociation<S>,
    pc_id: u8,
    command: &[u8],
    dataset: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), std::io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let max = fragment_len(assoc.peer_max_pdu_length());
    crate::pdata::write_message(assoc.inner_stream(), pc_id, command, dataset, max, timeout).await
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
        sub_operations: None,
    };
    // send_message honours the peer's maximum PDU length, including a
    // stated 0 ("no limit", pitfall C01).
    send_rsp(assoc, pc_id, rsp, identifier).await
}

enum End {
    Released,
    PeerAborted,
    /// Abort with A-ABORT source 2 (service provider) and this reason
    /// (PS3.8 §9.3.8), and the operator-facing explanation.
    Abort(AbortRQServiceProviderReason, String),
}

/// The dataset of a DIMSE message: in memory, or (a C-STORE larger than
/// the association's memory share) spilled to the encrypted spool.
enum Payload {
    Memory(Vec<u8>),
    Spilled(SpooledData),
}

impl Payload {
    /// The bytes of an in-memory dataset; only C-STORE datasets are ever
    /// spilled, so other requests see an empty one in that (unreachable) case.
    fn into_memory(self) -> Vec<u8> {
        match self {
            Payload::Memory(v) => v,
            Payload::Spilled(_) => Vec::new(),
        }
    }
}

struct Session {
    device: Device,
    peer: SocketAddr,
    command: Vec<u8>,
    dataset: Vec<u8>,
    /// The C-STORE dataset being received once it outgrew the memory share.
    spill: Option<Spill>,
    pending: Option<(u8, Request)>,
    /// Why the dataset being received is discarded (over `max_dataset_bytes`
    /// or the memory budget): the Error Comment of its 0xA700.
    overflow: Option<String>,
    /// This association's share of the archive's memory budget, covering
    /// `dataset` (and, during ingest, its inflated form).
    reservation: Reservation,
    /// The C-FIND in progress, if any.
    find: Option<RunningFind>,
    /// The C-MOVE or C-GET in progress, if any.
    retrieve: Option<RunningRetrieve>,
    /// Message ID of our last C-STORE-RQ (C-GET sub-operation).
    next_store_id: u16,
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
///
/// SCP/SCU Role Selection (PS3.7 §D.3.3.4): for storage SOP classes (any class
/// that is neither Verification nor a Query/Retrieve model) the proposed roles
/// are accepted as proposed and echoed in the A-ASSOCIATE-AC, so a C-GET
/// requestor that proposed the SCP role receives C-STORE sub-operations on
/// those contexts. Other classes get no role item (default roles).
pub struct QueryNegotiation;

impl Negotiation for QueryNegotiation {
    fn extended_negotiation(&self, sop_class_uid: &str, input: &[u8]) -> Option<Vec<u8>> {
        let uid = sop_class_uid.trim_end_matches(['\0', ' ']);
        Model::for_find_sop_class(uid)?;
        Some(vec![u8::from(input.first() == Some(&1))])
    }

    fn negotiate_roles(
        &self,
        sop_class_uid: &str,
        scu_role: bool,
        scp_role: bool,
    ) -> Option<RequestorRoles> {
        let uid = sop_class_uid.trim_end_matches(['\0', ' ']);
        if uid == VERIFICATION || uid.starts_with(QR_PREFIX) {
            return None;
        }
        Some(RequestorRoles {
            scu: scu_role,
            scp: scp_role,
        })
    }
}

/// Verification SOP Class (PS3.4 Annex A).
const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Prefix of the Query/Retrieve SOP classes (PS3.4 Annex C, §C.6).
const QR_PREFIX: &str = "1.2.840.10008.5.1.4.1.2.";

/// Whether the A-ASSOCIATE-AC accepted the SCP role for `sop_class` (an SCP/SCU
/// Role Selection item with SCP-role = 1, PS3.7 §D.3.3.4).
fn scp_role_accepted(user_variables: &[UserVariableItem], sop_class: &str) -> bool {
    user_variables.iter().any(|uv| {
        matches!(uv, UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles)
            if uid.trim_end_matches(['\0', ' ']) == sop_class && roles.scp)
    })
}

/// Largest P-DATA-TF we send when the peer allows more (or stated no limit).
const MAX_SEND_PDU: usize = 1 << 20;

/// Data bytes per PDV so that one P-DATA-TF stays within the peer's maximum
/// PDU length (PS3.8 D.1; a PDV item costs 6 bytes of the variable field).
fn fragment_len(peer_max: u32) -> usize {
    (peer_max as usize).clamp(64, MAX_SEND_PDU) - 6
}

/// The policy's decision for one connection: the accepted device and the
/// client certificate it presented.
type Decision = Arc<Mutex<Option<(Device, Option<PeerCertificate>)>>>;

/// An unfinished connection closed to admit a newer one (see
/// [`DimseConfig::max_pending_per_address`]).
fn evicted_log(peer: SocketAddr) {
    tracing::debug!(%peer, "unfinished connection closed: evicted by a newer one");
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
                // Only associations the policy accepted take a slot; past
                // `max_associations` the device is told to come back later.
                let max = self.dimse.config.max_associations;
                let admitted = device.is_some()
                    && self
                        .dimse
                        .active
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n < max).then_some(n + 1)
                        })
                        .is_ok();
                if !admitted {
                    tracing::warn!(peer = %self.peer, calling_ae = %calling, max_associations = max,
                        "association rejected: too many associations at once");
                    events.record(
                        "association.rejected",
                        Outcome::Refused,
                        serde_json::json!({
                            "calling_ae": calling, "called_ae": called, "peer": self.peer.to_string(),
                            "reason": "too_many_associations",
                        }),
                    );
                    return Err(AssociationRJServiceUserReason::NoReasonGiven);
                }
                // The slot is given back by the `ActiveGuard` taken for it.
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

/// How long a rejected requestor has to close the connection (ARTIM timer,
/// PS3.8 §9.1.3).
const ARTIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads (and discards) until the peer closes the connection, an error, or
/// `timeout` elapses.
fn wait_for_close(mut conn: std::net::TcpStream, timeout: Duration) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    if conn.set_nonblocking(false).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The status, Error Comment and Offending Elements for an identifier that
/// cannot be decoded (0xC000-class "cannot understand") or parsed into a query
/// (PS3.4 C.4.1.1.4: 0xA900 with the offending tags, see
/// [`status::for_query_error`]).
fn identifier_refusal(e: &ArchiveError) -> (Status, String, Vec<dicom_core::Tag>) {
    match e {
        ArchiveError::NotDicom(_) => (
            Status::CANNOT_UNDERSTAND,
            "identifier cannot be decoded".to_owned(),
            Vec::new(),
        ),
        other => status::for_query_error(other),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_echoed_for_storage_classes_only() {
        let n = QueryNegotiation;
        assert_eq!(
            n.negotiate_roles("1.2.840.10008.5.1.4.1.1.2\0", false, true),
            Some(RequestorRoles {
                scu: false,
                scp: true
            })
        );
        assert_eq!(n.negotiate_roles(VERIFICATION, true, true), None);
        assert_eq!(
            n.negotiate_roles("1.2.840.10008.5.1.4.1.2.2.3", true, true),
            None
        );
        let uv = vec![UserVariableItem::ScuScpRoleSelectionSubItem(
            "1.2.840.10008.5.1.4.1.1.2".into(),
            RequestorRoles {
                scu: false,
                scp: true,
            },
        )];
        assert!(scp_role_accepted(&uv, "1.2.840.10008.5.1.4.1.1.2"));
        assert!(!scp_role_accepted(&uv, "1.2.840.10008.5.1.4.1.1.4"));
        assert!(!scp_role_accepted(&[], "1.2.840.10008.5.1.4.1.1.2"));
    }

    #[test]
    fn fragments_fit_the_peer_maximum() {
        assert_eq!(fragment_len(16384), 16378);
        assert_eq!(fragment_len(u32::MAX), MAX_SEND_PDU - 6);
        assert!(fragment_len(0) > 0);
    }
}
