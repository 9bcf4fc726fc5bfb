//! Writing a dataset as P-DATA-TF PDUs straight onto the association's
//! stream (PS3.8 §9.3.5, Annex E), for the large datasets of C-GET and
//! C-MOVE sub-operations.
//!
//! dicom-ul's `send` takes an owned [`dicom_ul::pdu::Pdu`], so each fragment
//! would be copied twice (into the PDU's `Vec`, then into its write buffer)
//! before TLS copies it a third time; a retrieval is mostly memory copies
//! otherwise. Here a large dataset's fragments go to the stream as they are,
//! each behind its 12-byte PDU and PDV headers, in vectored writes (TLS
//! copies each once into its records; plain TCP uses `writev`); a small
//! message is copied once into one buffer and written in one call. This is
//! the only place Bastion encodes PDU headers itself.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// P-DATA-TF PDU type (PS3.8 Table 9-22).
const P_DATA_TF: u8 = 0x04;
/// Bytes of PDU header (type, reserved, length) plus PDV item header (item
/// length, presentation context ID, message control header).
const HEADERS: usize = 6 + 6;
/// The buffer is written out once it holds this much.
const BATCH: usize = 256 * 1024;

/// Writes one DIMSE message: the `command` set as command PDVs, then the
/// `dataset` (if any) as data PDVs, each PDV at most `max_data` bytes (at
/// least one PDV per part; the last of each part carries the last-fragment
/// flag), one PDV per P-DATA-TF PDU, on presentation context `pc_id`; then
/// flushes.
///
/// Public so that the `pdata` fuzz target (`fuzz/`) can check that dicom-ul
/// reads back what this writes; the server is its only other caller.
///
/// # Errors
/// The stream's I/O error, or `TimedOut` when the whole write takes longer
/// than `timeout`.
pub async fn write_message<W>(
    stream: &mut W,
    pc_id: u8,
    command: &[u8],
    dataset: Option<&[u8]>,
    max_data: usize,
    timeout: Duration,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let max_data = max_data.max(1);
    if let Some(data) = dataset.filter(|d| d.len() >= VECTORED_FROM) {
        let work = async {
            write_copied(stream, pc_id, command, None, max_data).await?;
            write_vectored(stream, pc_id, data, max_data, true).await?;
            stream.flush().await
        };
        return tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
    }
    let work = async {
        write_copied(stream, pc_id, command, dataset, max_data).await?;
        stream.flush().await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// [`write_message`] for a dataset that arrives in pieces (a large stored
/// instance read one blob segment at a time): the command, then `len`
/// dataset bytes from `pieces`, each piece written as it arrives (the last
/// fragment flagged, PS3.8 E.2), each write within `timeout`.
///
/// # Errors
/// The stream's write error; `TimedOut`; `InvalidData` when a piece is an
/// error (the instance could not be read: it failed authentication) or the
/// pieces add up to other than `len`. The message is then cut short: the
/// caller must give up the association.
pub async fn write_streamed<W>(
    stream: &mut W,
    pc_id: u8,
    command: &[u8],
    len: u64,
    pieces: &mut tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    max_data: usize,
    timeout: Duration,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let max_data = max_data.max(1);
    let timed = |e: tokio::time::error::Elapsed| -> std::io::Error {
        let _ = e;
        std::io::ErrorKind::TimedOut.into()
    };
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    tokio::time::timeout(
        timeout,
        write_copied(stream, pc_id, command, None, max_data),
    )
    .await
    .map_err(timed)??;
    let mut sent = 0u64;
    if len == 0 {
        let empty = pdu_header(pc_id, 0, false, true);
        tokio::time::timeout(timeout, stream.write_all(&empty))
            .await
            .map_err(timed)??;
    }
    while sent < len {
        let piece = match tokio::time::timeout(timeout, pieces.recv())
            .await
            .map_err(timed)?
        {
            Some(Ok(piece)) => piece,
            Some(Err(e)) => return Err(bad(e)),
            None => return Err(bad("the stored instance ended early".into())),
        };
        let after = sent + piece.len() as u64;
        if after > len || piece.is_empty() {
            return Err(bad("the stored instance is not its recorded length".into()));
        }
        tokio::time::timeout(
            timeout,
            write_vectored(stream, pc_id, &piece, max_data, after == len),
        )
        .await
        .map_err(timed)??;
        sent = after;
    }
    tokio::time::timeout(timeout, stream.flush())
        .await
        .map_err(timed)?
}

/// Datasets at least this large are written with vectored writes (headers
/// and the caller's bytes, no copy here); smaller messages are copied into
/// one buffer and written at once.
const VECTORED_FROM: usize = 64 * 1024;
/// PDUs per vectored write (two slices each; well under IOV_MAX).
const PDUS_PER_WRITE: usize = 64;

/// `dataset` as data PDVs, each PDU's header and fragment given to the
/// stream as separate slices of one vectored write per [`PDUS_PER_WRITE`]
/// PDUs (TLS then copies each fragment once, into its record; plain TCP
/// hands the slices to `writev`).
async fn write_vectored<W>(
    stream: &mut W,
    pc_id: u8,
    dataset: &[u8],
    max_data: usize,
    ends: bool,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let chunks: Vec<&[u8]> = dataset.chunks(max_data).collect();
    let n = chunks.len();
    for (g, group) in chunks.chunks(PDUS_PER_WRITE).enumerate() {
        let headers: Vec<[u8; HEADERS]> = group
            .iter()
            .enumerate()
            .map(|(i, c)| {
                pdu_header(
                    pc_id,
                    c.len(),
                    false,
                    ends && g * PDUS_PER_WRITE + i + 1 == n,
                )
            })
            .collect();
        let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(2 * group.len());
        for (h, c) in headers.iter().zip(group) {
            slices.push(std::io::IoSlice::new(h));
            slices.push(std::io::IoSlice::new(c));
        }
        let mut rest: &mut [std::io::IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let written = stream.write_vectored(rest).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut rest, written);
        }
    }
    Ok(())
}

/// The 12 header bytes of a P-DATA-TF PDU holding one PDV of `len` bytes.
fn pdu_header(pc_id: u8, len: usize, is_command: bool, last: bool) -> [u8; HEADERS] {
    // Lengths fit: `max_data` comes from a u32 maximum PDU length.
    let item_len = (len + 2) as u32;
    let pdu_len = item_len + 4;
    let mut h = [0u8; HEADERS];
    h[0] = P_DATA_TF;
    h[2..6].copy_from_slice(&pdu_len.to_be_bytes());
    h[6..10].copy_from_slice(&item_len.to_be_bytes());
    h[10] = pc_id;
    // Message Control Header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
    h[11] = u8::from(is_command) | if last { 0x02 } else { 0x00 };
    h
}

/// The command, then the dataset (if any), copied behind their headers into
/// a buffer written every [`BATCH`] bytes and at the end.
async fn write_copied<W>(
    stream: &mut W,
    pc_id: u8,
    command: &[u8],
    dataset: Option<&[u8]>,
    max_data: usize,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = Vec::with_capacity(
        (command.len() + dataset.map_or(0, <[u8]>::len)).min(BATCH)
            + 2 * HEADERS
            + max_data.min(1 << 20),
    );
    let parts = std::iter::once((command, true)).chain(dataset.map(|d| (d, false)));
    for (bytes, is_command) in parts {
        let mut chunks = bytes.chunks(max_data).peekable();
        let mut first = true;
        while first || chunks.peek().is_some() {
            first = false;
            let chunk = chunks.next().unwrap_or_default();
            let last = chunks.peek().is_none();
            push_pdu(&mut buf, pc_id, chunk, is_command, last);
            if buf.len() >= BATCH {
                stream.write_all(&buf).await?;
                buf.clear();
            }
        }
    }
    stream.write_all(&buf).await
}

/// Appends one P-DATA-TF PDU holding one PDV.
fn push_pdu(buf: &mut Vec<u8>, pc_id: u8, data: &[u8], is_command: bool, last: bool) {
    buf.reserve(HEADERS + data.len());
    buf.extend_from_slice(&pdu_header(pc_id, data.len(), is_command, last));
    buf.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{read_pdu, PDataValueType, Pdu};

    /// What we write is what dicom-ul reads: the command fragments then the
    /// data fragments, in order, with the last flag on the final one of each.
    #[tokio::test]
    async fn dicom_ul_reads_what_we_write() {
        for (len, max) in [
            (0usize, 100usize),
            (1, 100),
            (100, 100),
            (101, 100),
            (300_000, 64),
        ] {
            let command: Vec<u8> = (0..150u8).collect();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out: Vec<u8> = Vec::new();
            write_message(
                &mut out,
                3,
                &command,
                Some(&data),
                max,
                Duration::from_secs(5),
            )
            .await
            .expect("write to a Vec");
            let mut cursor = std::io::Cursor::new(&out[..]);
            let (mut got_cmd, mut got) = (Vec::new(), Vec::new());
            let (mut cmd_lasts, mut lasts) = (Vec::new(), Vec::new());
            while (cursor.position() as usize) < out.len() {
                match read_pdu(&mut cursor, 1 << 20, true).expect("valid PDU") {
                    Some(Pdu::PData { data: pdvs }) => {
                        assert_eq!(pdvs.len(), 1);
                        let pdv = &pdvs[0];
                        assert_eq!(pdv.presentation_context_id, 3);
                        assert!(pdv.data.len() <= max);
                        if pdv.value_type == PDataValueType::Command {
                            assert!(lasts.is_empty(), "command after data");
                            got_cmd.extend_from_slice(&pdv.data);
                            cmd_lasts.push(pdv.is_last);
                        } else {
                            got.extend_from_slice(&pdv.data);
                            lasts.push(pdv.is_last);
                        }
                    }
                    other => panic!("expected P-DATA-TF, got {other:?}"),
                }
            }
            assert_eq!(got_cmd, command);
            assert_eq!(got, data, "len {len} max {max}");
            for l in [&cmd_lasts, &lasts] {
                assert_eq!(l.iter().filter(|l| **l).count(), 1);
                assert_eq!(l.last(), Some(&true));
            }
            assert_eq!(lasts.len(), len.div_ceil(max).max(1));
        }
    }

    /// A streamed dataset is written as the same PDUs dicom-ul reads back:
    /// every piece fragmented within `max`, the last flag only on the final
    /// fragment of the final piece; an error piece or a short stream is an
    /// error, never a message that looks complete.
    #[tokio::test]
    async fn streamed_datasets_are_fragmented_like_whole_ones() {
        for (pieces, max) in [
            (vec![1usize], 100usize),
            (vec![100, 1, 250], 100),
            (vec![70_000, 70_000, 3], 16_372),
        ] {
            let command: Vec<u8> = (0..40u8).collect();
            let data: Vec<u8> = (0..pieces.iter().sum::<usize>())
                .map(|i| (i % 251) as u8)
                .collect();
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let mut at = 0;
            for n in &pieces {
                tx.send(Ok(data[at..at + n].to_vec())).await.expect("send");
                at += n;
            }
            let mut out: Vec<u8> = Vec::new();
            write_streamed(
                &mut out,
                5,
                &command,
                data.len() as u64,
                &mut rx,
                max,
                Duration::from_secs(5),
            )
            .await
            .expect("write");
            let mut cursor = std::io::Cursor::new(&out[..]);
            let (mut got, mut lasts) = (Vec::new(), Vec::new());
            while (cursor.position() as usize) < out.len() {
                match read_pdu(&mut cursor, 1 << 20, true).expect("valid PDU") {
                    Some(Pdu::PData { data: pdvs }) => {
                        let pdv = &pdvs[0];
                        assert!(pdv.data.len() <= max);
                        if pdv.value_type == PDataValueType::Data {
                            got.extend_from_slice(&pdv.data);
                            lasts.push(pdv.is_last);
                        }
                    }
                    other => panic!("expected P-DATA-TF, got {other:?}"),
                }
            }
            assert_eq!(got, data, "pieces {pieces:?}");
            assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
            assert_eq!(lasts.last(), Some(&true));
        }
        // an error piece, and a stream that ends early
        for tail in [
            Some(Err("segment 3 failed authentication".to_owned())),
            None,
        ] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            tx.send(Ok(vec![7u8; 10])).await.expect("send");
            if let Some(t) = tail {
                tx.send(t).await.expect("send");
            }
            drop(tx);
            let mut out: Vec<u8> = Vec::new();
            let e = write_streamed(&mut out, 1, &[1, 2], 30, &mut rx, 8, Duration::from_secs(5))
                .await
                .expect_err("cut short");
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            // nothing flagged as the last fragment went out
            let mut cursor = std::io::Cursor::new(&out[..]);
            while (cursor.position() as usize) < out.len() {
                if let Some(Pdu::PData { data: pdvs }) =
                    read_pdu(&mut cursor, 1 << 20, true).expect("pdu")
                {
                    assert!(pdvs[0].value_type == PDataValueType::Command || !pdvs[0].is_last);
                }
            }
        }
    }
}
