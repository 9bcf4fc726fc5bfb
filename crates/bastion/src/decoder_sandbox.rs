//! JPEG 2000, JPEG-LS and 12-bit JPEG decoding in a sandboxed child
//! process ([`bastion_archive::isolated`]).
//!
//! The only JPEG 2000 decoders are OpenJPEG (C) and `openjp2` (OpenJPEG
//! translated into `unsafe` Rust); the only JPEG-LS decoder is CharLS (C++,
//! through the `charls` crate, built from its bundled sources with cmake);
//! the only 12-bit JPEG decoder is libjpeg-turbo (C). Bastion decodes
//! peer-supplied codestreams with them, but never in the server: `serve`
//! registers a [`ChildDecoder`], which runs `bastion decode-image MAX CODEC`
//! (a hidden subcommand; CODEC `jp2`, `jls` or `jpeg12`) per codestream:
//!
//! - the child starts with an empty environment, in `/`, with stdin, stdout
//!   and stderr as its only open files; it sets resource limits (address
//!   space 2 GiB, CPU 30 s, no file creation, 16 descriptors), reads the
//!   codestream from stdin, then enters a **seccomp** filter (seccompiler)
//!   that allows only memory management, `read`/`write` on the descriptors
//!   it has, signals needed to exit and `exit_group`: no `open`, `socket`,
//!   `execve`, `fork`… A decoder bug exploited by a crafted image can
//!   neither read the data directory (master key, database) nor reach the
//!   network; its worst is a wrong picture or a dead child;
//! - the parent writes the codestream, reads at most the expected size plus
//!   a header, kills the child after [`TIMEOUT`], and runs at most
//!   [`MAX_CHILDREN`] at once (others wait).
//!
//! Output of the child: `BJ2K`, width u32, height u32, components u16,
//! precision u8, signed u8 (little endian), then the samples interleaved by
//! component, 1 byte each (precision ≤ 8) or 2 bytes little endian. Exit
//! status 0; 2 with one line on stderr for an undecodable codestream; 3
//! when the sandbox cannot be set up (the child refuses to decode without
//! it).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    sync::{mpsc, Arc, Condvar, Mutex},
    time::Duration,
};

use bastion_archive::isolated::{DecodedImage, IsolatedCodec, IsolatedDecoder};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "decode-image";
/// A child that has not answered by then is killed.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Children decoding at the same time (the rest wait).
pub const MAX_CHILDREN: usize = 2;
/// The child's address space limit, bytes.
const CHILD_ADDRESS_SPACE: u64 = 2 << 30;
/// The child's CPU time limit, seconds.
const CHILD_CPU_SECS: u64 = 30;
/// Largest codestream accepted, bytes.
const MAX_CODESTREAM: u64 = 1 << 30;
const MAGIC: &[u8; 4] = b"BJ2K";
/// Magic, width, height, components, precision, signed.
const HEADER: usize = 16;

/// Decodes JPEG 2000, JPEG-LS and 12-bit JPEG by running `exe decode-image`
/// per codestream.
pub struct ChildDecoder {
    exe: PathBuf,
    running: Mutex<usize>,
    freed: Condvar,
}

impl ChildDecoder {
    /// A decoder that runs `exe` (this binary: `std::env::current_exe()`).
    pub fn new(exe: PathBuf) -> ChildDecoder {
        ChildDecoder {
            exe,
            running: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self) -> Slot<'_> {
        let mut n = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_CHILDREN {
            n = self.freed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Slot(self)
    }
}

struct Slot<'a>(&'a ChildDecoder);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut n = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

impl IsolatedDecoder for ChildDecoder {
    fn decode(
        &self,
        codec: IsolatedCodec,
        codestream: &[u8],
        max_bytes: usize,
    ) -> Result<DecodedImage, String> {
        let label = codec.label();
        let _slot = self.acquire();
        let mut child = Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .arg(max_bytes.to_string())
            .arg(codec.arg())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {label} decoder process: {e}"))?;
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the {label} decoder process has no pipes"));
        };
        let child = Arc::new(Mutex::new(child));
        // Watchdog: kill the child when it overruns.
        let (done, finished) = mpsc::channel::<()>();
        let watched = child.clone();
        let watchdog = std::thread::spawn(move || {
            if finished.recv_timeout(TIMEOUT).is_err() {
                let _ = watched.lock().unwrap_or_else(|p| p.into_inner()).kill();
                return true;
            }
            false
        });
        let input = codestream.to_vec();
        let writer = std::thread::spawn(move || {
            // A child that dies early closes the pipe: not our error to report.
            let _ = stdin.write_all(&input);
        });
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = (&mut stderr).take(4096).read_to_string(&mut text);
            text
        });
        let mut out = Vec::new();
        let read = stdout
            .take((HEADER + max_bytes + 1) as u64)
            .read_to_end(&mut out);
        let _ = writer.join();
        let status = child.lock().unwrap_or_else(|p| p.into_inner()).wait();
        let _ = done.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        let message = errors.join().unwrap_or_default();
        if timed_out {
            return Err(format!(
                "the {label} decoder took more than {} s and was stopped",
                TIMEOUT.as_secs()
            ));
        }
        let status = status.map_err(|e| format!("{label} decoder process: {e}"))?;
        read.map_err(|e| format!("reading the {label} decoder's output: {e}"))?;
        if !status.success() {
            let line = message.lines().next().unwrap_or("").trim();
            return Err(match status.code() {
                Some(_) if !line.is_empty() => line.to_owned(),
                Some(c) => format!("the {label} decoder failed (exit status {c})"),
                None => format!(
                    "the {label} decoder was killed (crash, resource limit or a \
                     forbidden system call)"
                ),
            });
        }
        parse_output(&out, max_bytes)
    }
}

/// The child's answer, checked.
fn parse_output(out: &[u8], max_bytes: usize) -> Result<DecodedImage, String> {
    let bad = || "malformed output from the isolated decoder".to_owned();
    if out.len() < HEADER || &out[..4] != MAGIC {
        return Err(bad());
    }
    let u32_at = |i: usize| u32::from_le_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]);
    let width = u32_at(4);
    let height = u32_at(8);
    let components = u16::from_le_bytes([out[12], out[13]]);
    let (precision, signed) = (out[14], out[15]);
    let samples = &out[HEADER..];
    let per = if precision <= 8 { 1u64 } else { 2 };
    let expected = u64::from(width) * u64::from(height) * u64::from(components) * per;
    if expected != samples.len() as u64 || samples.len() > max_bytes {
        return Err(bad());
    }
    Ok(DecodedImage {
        width,
        height,
        components,
        precision,
        signed: signed != 0,
        samples: samples.to_vec(),
    })
}

/// `bastion decode-image MAX_BYTES CODEC`: the child. Never returns to the
/// caller's normal flow with an error: the exit code and one stderr line
/// say it.
pub fn run_child(max_bytes: usize, codec: Option<IsolatedCodec>) -> ExitCode {
    let Some(codec) = codec else {
        eprintln!("unknown codec");
        return ExitCode::from(2);
    };
    if let Err(e) = limit_resources() {
        eprintln!("sandbox unavailable: {e}");
        return ExitCode::from(3);
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .lock()
        .take(MAX_CODESTREAM)
        .read_to_end(&mut input)
    {
        eprintln!("cannot read the codestream: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = enter_seccomp() {
        eprintln!("sandbox unavailable: {e}");
        return ExitCode::from(3);
    }
    match decode(codec, &input, max_bytes) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(&out)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// Decodes one codestream of `codec` into the output format (header +
/// samples).
fn decode(codec: IsolatedCodec, codestream: &[u8], max_bytes: usize) -> Result<Vec<u8>, String> {
    match codec {
        IsolatedCodec::Jpeg2000 => decode_j2k(codestream, max_bytes),
        IsolatedCodec::JpegLs => decode_jls(codestream, max_bytes),
        IsolatedCodec::Jpeg12 => decode_jpeg12(codestream, max_bytes),
    }
}

/// The output header.
fn header(width: u32, height: u32, components: u16, precision: u8, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&components.to_le_bytes());
    out.push(precision);
    out.push(0);
    out
}

/// Checks a decoder's frame header against the limits: 1 or 3 components,
/// `bits` within 2–16, the decoded size within `max_bytes`. Returns bytes
/// per sample and the decoded size.
fn checked_size(
    width: u32,
    height: u32,
    components: i64,
    bits: i64,
    max_bytes: usize,
) -> Result<(usize, usize), String> {
    if !matches!(components, 1 | 3) {
        return Err(format!("{components} components (1 or 3 can be shown)"));
    }
    if !(2..=16).contains(&bits) {
        return Err(format!("precision {bits} (2 to 16 bits can be decoded)"));
    }
    let per = if bits <= 8 { 1usize } else { 2 };
    let size = u64::from(width) * u64::from(height) * components as u64 * per as u64;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= max_bytes)
        .ok_or_else(|| format!("{width}×{height}×{components} samples exceed the limit"))?;
    Ok((per, size))
}

/// JPEG-LS (ISO 14495-1) with CharLS. Samples come out interleaved by pixel
/// for the line and sample interleave modes; a colour image coded by plane
/// (interleave mode 0, one component per scan) is interleaved here.
fn decode_jls(codestream: &[u8], max_bytes: usize) -> Result<Vec<u8>, String> {
    let malformed = |e: charls::Error| {
        format!("the JPEG-LS codestream is malformed or uses an unsupported feature\n({e})")
    };
    let info = charls::CharLS::default()
        .get_frame_info(codestream)
        .map_err(malformed)?;
    let (per, size) = checked_size(
        info.width,
        info.height,
        i64::from(info.component_count),
        i64::from(info.bits_per_sample),
        max_bytes,
    )?;
    let samples = charls::CharLS::default()
        .decode(codestream)
        .map_err(malformed)?;
    if samples.len() != size {
        return Err(format!(
            "the JPEG-LS decoder produced {} bytes, {size} expected",
            samples.len()
        ));
    }
    let n = info.component_count as usize;
    let mut out = header(
        info.width,
        info.height,
        n as u16,
        info.bits_per_sample as u8,
        size,
    );
    if n == 3 && jls_interleave(codestream) == Some(0) {
        let plane = size / 3;
        for p in 0..plane / per {
            for c in 0..3 {
                let at = c * plane + p * per;
                out.extend_from_slice(&samples[at..at + per]);
            }
        }
    } else {
        out.extend_from_slice(&samples);
    }
    Ok(out)
}

/// The interleave mode (ILV) of the first JPEG-LS scan header (ISO 14495-1
/// §C.2.3: SOS length, Ns, Ns × (Ci, Tmi), NEAR, ILV), `None` when not found.
fn jls_interleave(codestream: &[u8]) -> Option<u8> {
    let mut pos = 2usize; // after SOI
    while pos + 4 <= codestream.len() {
        if codestream[pos] != 0xFF {
            return None;
        }
        let marker = codestream[pos + 1];
        let len = usize::from(u16::from_be_bytes([
            codestream[pos + 2],
            codestream[pos + 3],
        ]));
        if marker == 0xDA {
            let ns = usize::from(*codestream.get(pos + 4)?);
            return codestream.get(pos + 4 + 1 + 2 * ns + 1).copied();
        }
        pos += 2 + len;
    }
    None
}

/// JPEG 2000 (ISO 15444-1) with `openjp2` through `jpeg2k`.
fn decode_j2k(codestream: &[u8], max_bytes: usize) -> Result<Vec<u8>, String> {
    // The library's own wording ("failed to encode" for a decode failure)
    // misleads; it goes on a second line, which the parent does not show.
    let image = jpeg2k::Image::from_bytes(codestream).map_err(|e| {
        format!("the JPEG 2000 codestream is malformed or uses an unsupported feature\n({e})")
    })?;
    let (width, height) = (image.width(), image.height());
    let comps = image.components();
    let n = comps.len();
    if !matches!(n, 1 | 3) {
        return Err(format!("{n} components (1 or 3 can be shown)"));
    }
    let precision = comps.first().map(|c| c.precision()).unwrap_or(0);
    if !(1..=16).contains(&precision) {
        return Err(format!(
            "precision {precision} (1 to 16 bits can be decoded)"
        ));
    }
    let signed = comps.first().is_some_and(|c| c.is_signed());
    for (i, c) in comps.iter().enumerate() {
        if c.width() != width || c.height() != height {
            return Err(format!("component {i} is subsampled"));
        }
        if c.precision() != precision || c.is_signed() != signed {
            return Err(format!("component {i} differs in precision or sign"));
        }
    }
    let per = if precision <= 8 { 1usize } else { 2 };
    let pixels = usize::try_from(u64::from(width) * u64::from(height))
        .map_err(|_| "image too large".to_owned())?;
    let size = pixels
        .checked_mul(n * per)
        .filter(|s| *s <= max_bytes)
        .ok_or_else(|| format!("{width}×{height}×{n} samples exceed the limit"))?;
    let mut out = Vec::with_capacity(HEADER + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.push(precision as u8);
    out.push(u8::from(signed));
    let data: Vec<&[i32]> = comps.iter().map(|c| c.data()).collect();
    if data.iter().any(|d| d.len() != pixels) {
        return Err("component data of the wrong size".into());
    }
    for p in 0..pixels {
        for d in &data {
            let v = d[p];
            if per == 1 {
                out.push(v as u8);
            } else {
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
    }
    Ok(out)
}

/// 12-bit JPEG (ISO 10918-1 process 4) with libjpeg-turbo's
/// `tj3Decompress12` (`bastion-jpeg12`); colour comes out RGB.
fn decode_jpeg12(codestream: &[u8], max_bytes: usize) -> Result<Vec<u8>, String> {
    let image = bastion_jpeg12::decode12(codestream, max_bytes / 2).map_err(|e| {
        format!("the 12-bit JPEG codestream is malformed or uses an unsupported feature\n({e})")
    })?;
    let (_, size) = checked_size(
        image.width,
        image.height,
        i64::from(image.components),
        i64::from(image.precision),
        max_bytes,
    )?;
    if image.samples.len() * 2 != size {
        return Err("the 12-bit JPEG decoder produced the wrong number of samples".into());
    }
    let mut out = header(
        image.width,
        image.height,
        image.components,
        image.precision,
        size,
    );
    for v in &image.samples {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

fn limit_resources() -> Result<(), String> {
    use rlimit::Resource;
    let set = |r: Resource, v: u64, name: &str| {
        r.set(v, v).map_err(|e| format!("cannot limit {name}: {e}"))
    };
    set(Resource::AS, CHILD_ADDRESS_SPACE, "the address space")?;
    set(Resource::CPU, CHILD_CPU_SECS, "CPU time")?;
    set(Resource::FSIZE, 0, "file size")?;
    set(Resource::NOFILE, 16, "open files")?;
    set(Resource::CORE, 0, "core dumps")?;
    Ok(())
}

/// The system calls the decoding child may make once it has its input.
fn allowed_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_clock_gettime,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

/// Installs the seccomp filter: anything outside [`allowed_syscalls`] kills
/// the process (SIGSYS). Also sets `no_new_privs`.
fn enter_seccomp() -> Result<(), String> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| format!("seccomp program: {e:?}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    const PROBE: &str = "BASTION_SECCOMP_PROBE";

    /// Re-runs this test binary on one test with `PROBE` set: the child
    /// enters the sandbox and tries what `PROBE` names; a forbidden call
    /// must kill it with SIGSYS (31).
    fn probe(what: &str) -> std::process::ExitStatus {
        let exe = std::env::current_exe().expect("test binary");
        Command::new(exe)
            .args([
                "--exact",
                "decoder_sandbox::tests::probe_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE, what)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run the probe")
    }

    #[test]
    fn probe_child() {
        let Ok(what) = std::env::var(PROBE) else {
            return; // only meaningful as the re-run child
        };
        limit_resources().expect("limits");
        enter_seccomp().expect("seccomp");
        match what.as_str() {
            "open" => {
                let _ = std::fs::File::open("/etc/hostname");
            }
            "socket" => {
                let _ = std::net::TcpStream::connect("127.0.0.1:9");
            }
            "spawn" => {
                let _ = Command::new("/bin/true").status();
            }
            _ => {}
        }
        // Reaching here means the call was allowed: exit with a marker.
        std::process::exit(42);
    }

    #[test]
    fn the_sandbox_forbids_files_network_and_processes() {
        for what in ["open", "socket", "spawn"] {
            let status = probe(what);
            assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
        }
        // Memory and plain exit are allowed.
        let status = probe("nothing");
        assert_eq!(status.code(), Some(42), "{status:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        for codec in [
            IsolatedCodec::Jpeg2000,
            IsolatedCodec::JpegLs,
            IsolatedCodec::Jpeg12,
        ] {
            assert!(decode(codec, b"not a codestream", 1 << 20).is_err());
            assert!(decode(codec, &[0xFF, 0x4F, 0xFF, 0x51, 0, 0], 1 << 20).is_err());
            assert!(decode(codec, &[0xFF, 0xD8, 0xFF, 0xF7, 0, 0], 1 << 20).is_err());
        }
    }

    /// A JPEG-LS codestream of `samples` (2 × 2, 8-bit) by CharLS.
    fn jls(components: i32, mode: charls::InterleaveMode, samples: &[u8]) -> Vec<u8> {
        let mut codec = charls::CharLS::default();
        codec.set_interleave_mode(mode).expect("mode");
        codec
            .encode(
                charls::FrameInfo {
                    width: 2,
                    height: 2,
                    bits_per_sample: 8,
                    component_count: components,
                },
                0,
                samples,
            )
            .expect("encoded")
    }

    #[test]
    fn jpeg_ls_colour_comes_out_interleaved_by_pixel() {
        let rgb = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let planar = [1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12];
        for (mode, input) in [
            (charls::InterleaveMode::Sample, rgb),
            (charls::InterleaveMode::Line, rgb),
            (charls::InterleaveMode::None, planar),
        ] {
            let cs = jls(3, mode, &input);
            let out = decode(IsolatedCodec::JpegLs, &cs, 1 << 20).expect("decoded");
            let img = parse_output(&out, 1 << 20).expect("valid output");
            assert_eq!((img.width, img.height, img.components), (2, 2, 3));
            assert_eq!(img.samples, rgb.to_vec(), "{mode:?}");
        }
        let grey = jls(1, charls::InterleaveMode::None, &[0, 50, 100, 255]);
        let img = parse_output(
            &decode(IsolatedCodec::JpegLs, &grey, 1 << 20).expect("decoded"),
            1 << 20,
        )
        .expect("valid output");
        assert_eq!(img.samples, vec![0, 50, 100, 255]);
        // the cap is checked from the header, before decoding
        assert!(decode(IsolatedCodec::JpegLs, &grey, 3).is_err());
    }

    #[test]
    fn output_is_checked() {
        let mut out = Vec::from(*MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&[8, 0, 7, 9]);
        let img = parse_output(&out, 100).expect("valid");
        assert_eq!((img.width, img.height, img.samples), (2, 1, vec![7, 9]));
        assert!(parse_output(&out[..out.len() - 1], 100).is_err());
        assert!(parse_output(&out, 1).is_err());
        assert!(parse_output(b"XXXX", 100).is_err());
    }
}
