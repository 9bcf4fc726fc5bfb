//! Refusing associations while the audit trail cannot record (issue 10,
//! finding 1): A-ASSOCIATE-RJ with result 2 (rejected-transient), source 1
//! (DICOM UL service-user), reason 1 (no reason given), PS3.8 §9.3.4.
//!
//! dicom-ul's access-control hook can only answer a *permanent* rejection,
//! so this path reads the A-ASSOCIATE-RQ and writes the RJ itself, with
//! dicom-ul's own PDU reader and writer (nothing is parsed here by hand).
//! The requestor is told to retry later; nothing of the request is served.

use std::time::Duration;

use dicom_ul::pdu::{
    read_pdu, write_pdu, AssociationRJ, AssociationRJResult, AssociationRJServiceUserReason,
    AssociationRJSource, Pdu,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest A-ASSOCIATE-RQ read on this path, bytes (a real one is well
/// under 64 KiB; a larger one is not read, only refused).
const MAX_RQ_BYTES: usize = 64 * 1024;

/// Reads one PDU from `stream` (within `timeout`), answers an
/// A-ASSOCIATE-RQ with A-ASSOCIATE-RJ 2/1/1 and waits (at most `linger`)
/// for the requestor to close the connection (PS3.8 §9.1.3, ARTIM).
///
/// Returns the calling and called AE titles of the request when it was an
/// A-ASSOCIATE-RQ that could be decoded (for the event record), `None`
/// otherwise (the connection is then simply closed).
pub async fn refuse_transient<S>(
    mut stream: S,
    timeout: Duration,
    linger: Duration,
) -> Option<(String, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rq = tokio::time::timeout(timeout, read_rq(&mut stream))
        .await
        .ok()
        .flatten();
    let titles = match &rq {
        Some(Pdu::AssociationRQ(rq)) => Some((
            rq.calling_ae_title.trim().to_owned(),
            rq.called_ae_title.trim().to_owned(),
        )),
        _ => None,
    };
    if rq.is_some() {
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
        });
        let mut bytes = Vec::new();
        if write_pdu(&mut bytes, &rj).is_ok() {
            let sent = tokio::time::timeout(timeout, async {
                stream.write_all(&bytes).await?;
                stream.flush().await
            })
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // Wait for the requestor to close (bounded); what it sends
                // meanwhile is discarded.
                let _ = tokio::time::timeout(linger, async {
                    let mut sink = [0u8; 1024];
                    loop {
                        match stream.read(&mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
            }
        }
    }
    let _ = stream.shutdown().await;
    titles
}

/// Reads one whole PDU (header + body up to [`MAX_RQ_BYTES`]) and decodes
/// it with dicom-ul; `None` for anything else or an oversized one.
async fn read_rq<S>(stream: &mut S) -> Option<Pdu>
where
    S: AsyncRead + Unpin,
{
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if header[0] != 0x01 || len > MAX_RQ_BYTES {
        return None;
    }
    let mut buf = Vec::with_capacity(6 + len);
    buf.extend_from_slice(&header);
    buf.resize(6 + len, 0);
    stream.read_exact(&mut buf[6..]).await.ok()?;
    read_pdu(&buf[..], MAX_RQ_BYTES as u32, false)
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::AssociationRQ;

    #[tokio::test(flavor = "multi_thread")]
    async fn an_association_request_gets_a_transient_rejection() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let rq = Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "MODALITY".into(),
            called_ae_title: "BASTION".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![],
            user_variables: vec![],
        });
        let mut bytes = Vec::new();
        write_pdu(&mut bytes, &rq).expect("encode");
        client.write_all(&bytes).await.expect("send");
        let task = tokio::spawn(refuse_transient(
            server,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ));
        let mut answer = vec![0u8; 10];
        client.read_exact(&mut answer).await.expect("RJ");
        // A-ASSOCIATE-RJ: type 03, length 4, reserved, result 2, source 1, reason 1.
        assert_eq!(answer, [0x03, 0, 0, 0, 0, 4, 0, 2, 1, 1]);
        drop(client);
        let titles = task.await.expect("task");
        assert_eq!(titles, Some(("MODALITY".into(), "BASTION".into())));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn anything_else_is_closed_without_an_answer() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&[0x04, 0, 0, 0, 0, 2, 0, 0])
            .await
            .expect("send");
        let titles = refuse_transient(server, Duration::from_secs(5), Duration::from_secs(1)).await;
        assert_eq!(titles, None);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty(), "{rest:?}");
    }
}
