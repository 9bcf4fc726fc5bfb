"""init, device and cert CLI contract."""
import json
import os
import stat

PASSWORD_LINE = "Initial admin password for user 'admin': "


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_init_layout_and_secrets(make_server):
    srv = make_server(start=False)
    d = srv.data
    assert mode(d) == 0o700
    # on PostgreSQL (BASTION_TEST_INDEX_URL) the index is not a file here
    pg = bool(os.environ.get("BASTION_TEST_INDEX_URL"))
    for f in ["bastion.toml", "tls/ca.crt", "tls/server.crt", "security.db",
              *([] if pg else ["index.db"]), "events/events.log"]:
        assert (d / f).is_file(), f
    assert (d / "index.db").exists() != pg
    # on S3 (BASTION_TEST_STORE_URL) the blobs are in the bucket
    assert (d / "blobs").is_dir() != bool(os.environ.get("BASTION_TEST_STORE_URL"))
    for f in ["tls/ca.key", "tls/server.key", "secrets/master.key",
              "secrets/audit-signing.key", "initial-admin-password"]:
        assert (d / f).is_file(), f
        assert mode(d / f) == 0o600, f"{f} has mode {oct(mode(d / f))}"
    lines = [l for l in srv.init_output.splitlines() if PASSWORD_LINE in l]
    assert len(lines) == 1, srv.init_output
    password = lines[0].split(PASSWORD_LINE, 1)[1].strip()
    assert len(password) >= 12
    assert (d / "initial-admin-password").read_text().strip() == password
    # a second init on an initialised dir fails and prints no password
    r = srv.cli("init", check=False)
    assert r.returncode != 0
    assert PASSWORD_LINE not in r.stdout + r.stderr


def test_serve_initialises_empty_dir(make_server):
    srv = make_server(init=False, start=True)
    assert (srv.data / "tls" / "ca.crt").is_file()
    assert mode(srv.data / "secrets" / "master.key") == 0o600
    assert PASSWORD_LINE in srv.log()
    assert sum(PASSWORD_LINE in l for l in srv.log().splitlines()) == 1


def test_device_crud_json(make_server):
    srv = make_server(start=False)
    srv.device_add("MOD1", network="10.1.0.0/16", transport="mtls", allow="echo,store",
                   cert_sha256="AB" * 32)
    srv.device_add("LEGACY", network="127.0.0.1/32", transport="plain", allow="echo",
                   host="127.0.0.1", port=11112, on_conflict="replace")
    r = srv.device_add("MOD1", check=False)
    assert r.returncode != 0, "adding an existing AE must fail"
    devs = {d["ae"]: d for d in srv.device_list()}
    assert set(devs) == {"MOD1", "LEGACY"}
    m = devs["MOD1"]
    assert m["network"] == "10.1.0.0/16"
    assert m["transport"] == "mtls"
    assert sorted(m["allow"]) == ["echo", "store"]
    assert m["cert_sha256"].replace(":", "").lower() == "ab" * 32
    l = devs["LEGACY"]
    assert l["transport"] == "plain" and l["allow"] == ["echo"]
    assert l["host"] == "127.0.0.1" and int(l["port"]) == 11112
    assert l["on_conflict"] == "replace"
    srv.device_update("LEGACY", network=None, transport=None, allow="echo,store,find")
    devs = {d["ae"]: d for d in srv.device_list()}
    assert sorted(devs["LEGACY"]["allow"]) == ["echo", "find", "store"]
    srv.device_remove("LEGACY")
    assert [d["ae"] for d in srv.device_list()] == ["MOD1"]
    assert srv.device_remove("LEGACY", check=False).returncode != 0


def test_cert_issue(make_server):
    import hashlib, ssl
    srv = make_server(start=False)
    srv.device_add("MOD1")
    crt, key, ca, fp = srv.cert_issue("MOD1")
    assert mode(key) == 0o600
    assert ca.read_bytes() == (srv.data / "tls" / "ca.crt").read_bytes()
    pem = crt.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    der = ssl.PEM_cert_to_DER_cert(first)
    assert hashlib.sha256(der).hexdigest() == fp
    assert "BEGIN PRIVATE KEY" in key.read_text()  # unencrypted PKCS#8


def test_serve_refuses_secret_readable_by_others(make_server):
    """A secret file readable by group/others stops `serve` with a message naming it."""
    srv = make_server(start=False)
    key = srv.data / "secrets" / "master.key"
    os.chmod(key, 0o640)
    r = srv.cli("serve", "--dicom-addr", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode != 0
    assert "master.key" in r.stderr and "readable by other users" in r.stderr, r.stderr
    # the other commands refuse too
    r = srv.cli("device", "list", check=False)
    assert r.returncode != 0 and "master.key" in r.stderr
    os.chmod(key, 0o600)
    srv.device_add("MOD1", transport="tls", allow="echo")
    srv.start()
    assert srv.echo("MOD1") == 0x0000
    assert srv.stop() == 0, "SIGTERM must end serve with exit code 0"


def test_second_serve_on_same_data_dir_refused(make_server):
    srv = make_server()
    r = srv.cli("serve", "--dicom-addr", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode != 0
    assert "already running" in r.stderr, r.stderr


def test_instance_get_never_overwrites(make_server, corpus_root, tmp_path):
    srv = make_server(start=False)
    ct = corpus_root / "pydicom" / "test_files" / "CT_small.dcm"
    code, summary, _, out = srv.import_(ct)
    assert code == 0 and summary["stored"] == 1, out
    uid = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    existing = tmp_path / "exists.dcm"
    existing.write_bytes(b"keep me")
    r = srv.cli("instance", "get", "--sop-uid", uid, "--out", str(existing), check=False)
    assert r.returncode != 0 and "must not exist" in r.stderr
    assert existing.read_bytes() == b"keep me"
    fresh = tmp_path / "fresh.dcm"
    srv.cli("instance", "get", "--sop-uid", uid, "--out", str(fresh))
    assert mode(fresh) == 0o600
    assert fresh.read_bytes()[128:132] == b"DICM"


def test_import_reports_what_it_skips(make_server, corpus_root, tmp_path):
    srv = make_server(start=False)
    ct = corpus_root / "pydicom" / "test_files" / "CT_small.dcm"
    folder = tmp_path / "imp"
    folder.mkdir()
    (folder / "link.dcm").symlink_to(ct)
    os.mkfifo(folder / "pipe")
    code, summary, rejected, out = srv.import_(folder)
    assert code == 1, out
    assert summary["rejected"] == 2 and summary["stored"] == 0, out
    reasons = {os.path.basename(p): r for p, r in rejected}
    assert "symbolic link" in reasons["link.dcm"]
    assert "not a regular file" in reasons["pipe"]
    # a symlink named on the command line is followed
    code, summary, _, out = srv.import_(folder / "link.dcm")
    assert code == 0 and summary["stored"] == 1, out


def test_cert_server_renews_server_certificate(make_server):
    """`cert server` replaces the server certificate under the same CA:
    clients keep their ca.crt, the new certificate names the extra host."""
    import ssl
    srv = make_server(start=False)
    before = (srv.data / "tls" / "server.crt").read_bytes()
    ca_before = (srv.data / "tls" / "ca.crt").read_bytes()
    r = srv.cli("cert", "server", "--host", "pacs.example.org")
    assert "restart" in r.stdout
    after = (srv.data / "tls" / "server.crt").read_bytes()
    assert after != before
    assert (srv.data / "tls" / "ca.crt").read_bytes() == ca_before
    assert mode(srv.data / "tls" / "server.key") == 0o600
    srv.device_add("RENEW", transport="tls", allow="echo")
    srv.start()
    assert srv.echo("RENEW") == 0x0000
    # the running server presents the new certificate
    pem = ssl.get_server_certificate(("127.0.0.1", srv.tls_port))
    assert ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(after.decode())


def test_doctor_reports_each_check_and_fails_on_a_damaged_database(make_server):
    """`bastion doctor`: every check on a fresh installation (exit 0, the keys
    inside the data directory are warnings), then a damaged index database and
    a world-readable key are failures (exit 1) naming what and where."""
    srv = make_server(start=False)
    r = srv.cli("doctor", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {line[6:26].strip(): line[:4].strip() for line in r.stdout.splitlines()
              if line[:4].strip() in ("ok", "warn", "FAIL")}
    for name in ("configuration", "permissions", "key location", "disk space", "master key",
                 "security database", "index database", "audit trail", "audit recording",
                 "certificates", "accounts", "alerts"):
        assert name in checks, (name, r.stdout)
    assert checks["index database"] == "ok" and checks["audit trail"] == "ok", r.stdout
    assert checks["key location"] == "warn", r.stdout
    assert "0 failures" in r.stdout
    j = srv.cli("doctor", "--json", check=False)
    rows = [json.loads(l) for l in j.stdout.splitlines() if l.strip()]
    assert {row["level"] for row in rows} <= {"ok", "warn", "fail"}
    assert any(row["check"] == "audit trail" and row["level"] == "ok" for row in rows)

    if os.environ.get("BASTION_TEST_INDEX_URL"):
        return  # the index is in PostgreSQL: no file here to damage
    # Damage the index database: overwrite 4 KiB in its second page.
    db = srv.data / "index.db"
    with open(db, "r+b") as f:
        f.seek(4096 + 100)
        f.write(os.urandom(4096))
    key = srv.data / "tls" / "ca.key"
    key.chmod(0o644)
    r = srv.cli("doctor", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
    assert any("permissions" in l and "ca.key" in l for l in fails), r.stdout
    assert any("index database" in l for l in fails), r.stdout

    # A configuration others may change is a failure; loose database modes a warning.
    key.chmod(0o600)
    (srv.data / "bastion.toml").chmod(0o666)
    (srv.data / "security.db").chmod(0o644)
    r = srv.cli("doctor", check=False)
    assert r.returncode == 1, r.stdout
    modes = [l for l in r.stdout.splitlines() if "file modes" in l]
    assert modes and modes[0].startswith("FAIL") and "bastion.toml" in modes[0] \
        and "security.db" in modes[0], r.stdout
    (srv.data / "bastion.toml").chmod(0o600)
    (srv.data / "security.db").chmod(0o600)

    # An emptied index is a failure, and doctor does not recreate it.
    db.write_bytes(b"")
    r = srv.cli("doctor", check=False)
    assert r.returncode == 1
    assert any(l.startswith("FAIL") and "index database" in l and "missing or empty" in l
               for l in r.stdout.splitlines()), r.stdout
    assert db.stat().st_size == 0, "doctor wrote to the index"


def test_doctor_without_installation(tmp_path, bastion_bin):
    import subprocess
    r = subprocess.run([str(bastion_bin), "--data", str(tmp_path / "none"), "doctor"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bastion init" in r.stderr


def _study_files(tmp_path):
    """Three studies with known attributes, written as Part 10 files:
    (files, {name: study uid}, {name: [sop uids]})."""
    import helpers
    from pydicom.uid import generate_uid

    specs = [
        # name, patient, id, date, time, accession, modality, description, series x instances
        ("old", "Smith^Anna", "P-100", "20190305", "101500", "ACC-1", "CT", "Chest", [2]),
        ("new", "Smith^Bert", "P-200", "20240611", "083000", "ACC-2", "MR", "Knee", [1, 2]),
        ("mid", "Jones^Carl", "P-300", "20220101", "120000", "ACC-3", "US", "Liver", [1]),
    ]
    out = tmp_path / "studies"
    out.mkdir()
    files, studies, sops = [], {}, {}
    for name, pn, pid, date, time_, acc, mod, desc, series in specs:
        study = generate_uid()
        studies[name] = study
        sops[name] = []
        for s_no, count in enumerate(series, start=1):
            series_uid = generate_uid()
            for i in range(1, count + 1):
                ds = helpers.make_dataset(patient_name=pn, patient_id=pid, pixel_bytes=512,
                                          study_uid=study, series_uid=series_uid)
                ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time_, acc
                ds.StudyDescription, ds.Modality = desc, mod
                ds.SeriesNumber, ds.InstanceNumber = s_no, i
                ds.SeriesDescription = f"{desc} series {s_no}"
                p = out / f"{name}-{s_no}-{i}.dcm"
                helpers.dataset_file(ds, p)
                files.append(p)
                sops[name].append(ds.SOPInstanceUID)
    return files, studies, sops


def test_study_list_and_show(make_server, tmp_path):
    srv = make_server(start=False)
    files, studies, sops = _study_files(tmp_path)
    code, summary, _, out = srv.import_(*files)
    assert code == 0 and summary["stored"] == len(files), out

    def listing(*args):
        return json.loads(srv.cli("study", "list", "--json", *args).stdout)

    every = listing()
    # newest first, with the values stored
    assert [s["study_instance_uid"] for s in every] == [studies["new"], studies["mid"], studies["old"]]
    new = every[0]
    assert new["patient_id"] == "P-200" and new["patient_name"] == "Smith^Bert"
    assert new["study_date"] == "20240611" and new["accession_number"] == "ACC-2"
    assert new["study_description"] == "Knee"
    assert new["modalities"] == ["MR"] and new["series"] == 2 and new["instances"] == 3
    assert every[2]["instances"] == 2 and every[2]["series"] == 1
    # filters: patient ID, name wildcards (case-insensitive like C-FIND), date range, accession
    assert [s["study_instance_uid"] for s in listing("--patient-id", "P-300")] == [studies["mid"]]
    assert {s["study_instance_uid"] for s in listing("--name", "smith*")} == {studies["new"], studies["old"]}
    assert [s["study_instance_uid"] for s in listing("--name", "Smith^?nna")] == [studies["old"]]
    assert [s["study_instance_uid"] for s in listing("--date", "20200101-20231231")] == [studies["mid"]]
    assert [s["study_instance_uid"] for s in listing("--date", "20190305")] == [studies["old"]]
    assert [s["study_instance_uid"] for s in listing("--accession", "ACC-2")] == [studies["new"]]
    assert listing("--patient-id", "NOBODY") == []
    # text output: one line per study, newest first
    text = srv.cli("study", "list").stdout.splitlines()
    rows = [l for l in text if studies["new"] in l or studies["mid"] in l or studies["old"] in l]
    assert len(rows) == 3 and studies["new"] in rows[0] and studies["old"] in rows[2]
    assert "ACC-2" in rows[0] and "MR" in rows[0]

    # show: series (number, modality, description, UID, count) and instance UIDs
    shown = json.loads(srv.cli("study", "show", studies["new"], "--json").stdout)
    assert shown["study_instance_uid"] == studies["new"] and shown["instances"] == 3
    assert [s["series_number"] for s in shown["series"]] == [1, 2]
    assert [len(s["instances"]) for s in shown["series"]] == [1, 2]
    assert shown["series"][1]["modality"] == "MR"
    assert shown["series"][1]["series_description"] == "Knee series 2"
    got = [i["sop_instance_uid"] for s in shown["series"] for i in s["instances"]]
    assert sorted(got) == sorted(sops["new"])
    assert {i["sop_class_uid"] for s in shown["series"] for i in s["instances"]} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert [i["instance_number"] for i in shown["series"][1]["instances"]] == [1, 2]
    text = srv.cli("study", "show", studies["old"]).stdout
    for uid in sops["old"]:
        assert uid in text

    # an unknown UID: exit 1 with a clear message
    r = srv.cli("study", "show", "1.2.826.0.1.3680043.99.1", check=False)
    assert r.returncode == 1 and "no study" in r.stderr, r.stderr
    assert r.stdout == ""
    r = srv.cli("study", "show", "not-a-uid", check=False)
    assert r.returncode == 1 and "not a valid Study Instance UID" in r.stderr, r.stderr
    # a malformed filter is refused with the reason
    r = srv.cli("study", "list", "--date", "2024-06", check=False)
    assert r.returncode != 0 and "date" in r.stderr, r.stderr

    # every use is an audited query by the CLI (never the patient ID in the event log)
    finds = [e for e in srv.events() if e.get("type") == "query.find" and e.get("actor") == "cli"]
    assert len(finds) >= 12, finds
    assert any(studies["new"] in e.get("study_uids", []) for e in finds)
    assert all("ae" not in e and "peer" not in e for e in finds)
    assert "P-200" not in (srv.data / "events" / "events.log").read_text()
    r = srv.cli("audit", "search", "--user", "cli", "--event", "query", "--json")
    records = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert len(records) >= 12
    assert any("<ParticipantObjectQuery>" in m for rec in records for m in rec["messages"])


def test_study_list_escapes_control_characters_and_survives_a_closed_pipe(make_server, tmp_path):
    """Patient data cannot drive the administrator's terminal: ESC, CR and LF
    in stored values are printed escaped (no fake row), and `study list |
    head -1` ends quietly (it once panicked on the broken pipe)."""
    import subprocess

    import helpers
    srv = make_server(start=False)
    ds = helpers.make_dataset(patient_name="EVIL\x1b[2K\x1b]0;pwned\x07", patient_id="ESC\x1b[31mRED")
    ds.StudyDescription = "line1\nFAKE 20990101 ROW\r"
    p = tmp_path / "evil.dcm"
    helpers.dataset_file(ds, p)
    code, summary, _, out = srv.import_(p)
    assert summary["stored"] == 1, out
    r = srv.cli("study", "list")
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\r" not in r.stdout, repr(r.stdout)
    lines = r.stdout.splitlines()
    assert len(lines) == 2, lines  # the header and one study: no fake row
    assert "\\u{1b}" in lines[1], lines[1]
    j = json.loads(srv.cli("study", "list", "--json").stdout)
    assert j[0]["patient_id"] == "ESC\x1b[31mRED"  # JSON escapes by itself
    for _ in range(3):
        helpers.dataset_file(helpers.make_dataset(patient_id="MANY"), tmp_path / "m.dcm")
        srv.import_(tmp_path / "m.dcm")
    piped = subprocess.run(f"{srv.bin} --data {srv.data} study list | head -1",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert "panicked" not in piped.stderr, piped.stderr


def test_index_on_postgres_credentials(make_server):
    """Index on PostgreSQL (issue 12): a wrong database password stops `serve`
    with a message naming the setting and where the password came from, never
    the password; without PGPASSWORD the 0600 secrets file index-password is
    used, and refused when others may read it."""
    import subprocess
    import pytest
    if not os.environ.get("BASTION_TEST_INDEX_URL"):
        pytest.skip("BASTION_TEST_INDEX_URL is not set: the index is embedded")
    srv = make_server(start=False)
    good = os.environ["PGPASSWORD"]

    def run(*args, env):
        cmd = [str(srv.bin), args[0], "--data", str(srv.data), *args[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL)

    wrong = dict(os.environ, PGPASSWORD="wrong-pw-h10xyz")
    r = run("serve", "--dicom-addr", "127.0.0.1:0", env=wrong)
    assert r.returncode != 0
    assert "[index] url" in r.stderr and "refused the credentials" in r.stderr, r.stderr
    assert "PGPASSWORD" in r.stderr, r.stderr
    assert "wrong-pw-h10xyz" not in r.stderr + r.stdout

    no_env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    pw_file = srv.data / "secrets" / "index-password"
    pw_file.write_text(good + "\n")
    os.chmod(pw_file, 0o600)
    r = run("doctor", env=no_env)
    assert "index database" in r.stdout and "opens with its key" in r.stdout, r.stdout + r.stderr
    os.chmod(pw_file, 0o644)
    r = run("doctor", env=no_env)
    assert "index-password" in r.stdout + r.stderr, r.stdout + r.stderr
    assert good not in r.stdout + r.stderr
    os.chmod(pw_file, 0o600)
    pw_file.write_text("wrong-file-pw\n")
    r = run("serve", "--dicom-addr", "127.0.0.1:0", env=no_env)
    assert r.returncode != 0 and "index-password" in r.stderr, r.stderr
    assert "wrong-file-pw" not in r.stderr + r.stdout


def test_a_password_written_into_the_index_url_is_never_echoed(tmp_path, bastion_bin):
    """An administrator who writes the database password into --index-url
    (user:PASSWORD@ or ?password=) is refused, and no message repeats it
    (outside test: `init`, `serve` and `migrate` printed the whole URL)."""
    import subprocess
    for i, url in enumerate(["postgres://bastion:Pw-echo-7Q@127.0.0.1:9/bastion",
                             "postgres://bastion@127.0.0.1:9/bastion?password=Pw-echo-7Q"]):
        data = tmp_path / f"d{i}"
        r = subprocess.run([str(bastion_bin), "init", "--data", str(data), "--index-url", url],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                           env=dict(os.environ, PGPASSWORD="x"))
        assert r.returncode != 0, r.stdout + r.stderr
        assert "Pw-echo-7Q" not in r.stdout + r.stderr, r.stderr
        assert "[index] url" in r.stderr or "--index-url" in r.stderr, r.stderr
