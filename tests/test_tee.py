"""Attestation on platform cvm: the real collection code on fixture configfs trees,
the SEV guest device's ioctl, the policy, and what records and pages say."""

import base64
import ctypes
import hashlib
import struct
from pathlib import Path

import pandas as pd
import pytest

from privbench import aggregate, harness, records, studies, tee
from privbench.studies.curves import make_run_spec
from privbench.studies.throughput import plan as throughput
from privbench.report import pages

RUN_ID = "jax-cnn-tiny-standard-b2"
NONCE = bytes(range(32))
REPORT_DATA = hashlib.sha512(NONCE + RUN_ID.encode()).digest()


def snp_report(report_data: bytes = REPORT_DATA) -> bytes:
    """An SEV-SNP attestation report's shape: 1184 bytes, user data at 0x50."""
    report = bytearray(1184)
    struct.pack_into("<I", report, 0, 3)  # version
    report[0x50:0x90] = report_data
    report[0x90:0xC0] = b"\x11" * 48  # launch measurement
    return bytes(report)


def tdx_quote(version: int = 4) -> bytes:
    """A TDX quote's shape: 48-byte header, (v5: 6-byte body descriptor), REPORTDATA at +520."""
    header = struct.pack("<HH", version, 2) + bytes(44)
    descriptor = struct.pack("<HI", 2, 584) if version == 5 else b""
    body = bytearray(584)
    body[520:584] = REPORT_DATA
    return header + descriptor + bytes(body) + b"signature data"


def configfs_tree(root: Path, provider: str, outblob: bytes, auxblob: bytes | None = None,
                  entry: str = "privbench") -> Path:
    """A configfs mount with one configfs-tsm report entry, as the kernel shows it."""
    path = root / "tsm" / "report" / entry
    path.mkdir(parents=True)
    (path / "provider").write_text(provider + "\n")
    (path / "generation").write_text("7\n")
    (path / "outblob").write_bytes(outblob)
    if auxblob is not None:
        (path / "auxblob").write_bytes(auxblob)
    return path


def test_sev_snp_report_through_configfs_tsm(tmp_path):
    entry = configfs_tree(tmp_path, "sev_guest", snp_report(), auxblob=b"certificate table")
    evidence = tee.collect(RUN_ID, configfs_root=tmp_path, sev_guest=tmp_path / "none",
                           nonce=NONCE, entry="privbench")
    assert (entry / "inblob").read_bytes() == REPORT_DATA  # 64 bytes: sha512(nonce || run id)
    assert evidence["status"] == "attested"
    assert (evidence["type"], evidence["interface"], evidence["provider"]) == ("sev-snp", "configfs-tsm", "sev_guest")
    assert evidence["nonce"] == NONCE.hex() and evidence["report_data"] == REPORT_DATA.hex()
    assert evidence["report_sha256"] == hashlib.sha256(snp_report()).hexdigest()
    assert evidence["nonce_bound"] is True and evidence["verified"] is False
    assert base64.b64decode(evidence["evidence"]["report"]) == snp_report()
    assert base64.b64decode(evidence["evidence"]["auxblob"]) == b"certificate table"


@pytest.mark.parametrize("version", [4, 5])
def test_tdx_quote_through_configfs_tsm(tmp_path, version):
    configfs_tree(tmp_path, "tdx_guest", tdx_quote(version))  # TDX has no auxblob
    evidence = tee.collect(RUN_ID, configfs_root=tmp_path, nonce=NONCE, entry="privbench")
    assert evidence["type"] == "tdx" and evidence["nonce_bound"] is True
    assert evidence["evidence"]["auxblob"] is None


def test_a_report_without_this_runs_nonce_is_refused(tmp_path):
    configfs_tree(tmp_path, "sev_guest", snp_report(report_data=bytes(64)))
    with pytest.raises(tee.AttestationError, match="does not carry this run's nonce"):
        tee.collect(RUN_ID, configfs_root=tmp_path, nonce=NONCE, entry="privbench")


def test_each_collection_makes_its_own_entry(tmp_path):
    # A plain folder is no kernel: the new entry gets no attributes, which is reported
    reports = tmp_path / "tsm" / "report"
    reports.mkdir(parents=True)
    with pytest.raises(tee.AttestationError, match="cannot read .*/privbench-[0-9]+-[0-9a-f]+/generation"):
        tee.collect(RUN_ID, configfs_root=tmp_path, nonce=NONCE)
    [entry] = reports.iterdir()
    assert (entry / "inblob").read_bytes() == REPORT_DATA


def test_sev_guest_device_fallback(tmp_path, monkeypatch):
    """SNP_GET_REPORT as the kernel answers it: the request carries the user data."""
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    seen = {}

    def fake_ioctl(fd, request, arg):
        assert request == 0xC0205300
        msg_version, request_address, response_address, _ = struct.unpack("<B7xQQQ", bytes(arg))
        seen["user_data"] = ctypes.string_at(request_address, 64)
        report = snp_report(seen["user_data"])
        response = struct.pack("<II", 0, len(report)) + bytes(24) + report
        ctypes.memmove(response_address, response, len(response))
        return 0

    monkeypatch.setattr(tee.fcntl, "ioctl", fake_ioctl)
    evidence = tee.collect(RUN_ID, configfs_root=tmp_path / "no-configfs", sev_guest=device, nonce=NONCE)
    assert seen["user_data"] == REPORT_DATA
    assert (evidence["type"], evidence["interface"], evidence["nonce_bound"]) == ("sev-snp", "sev-guest", True)
    assert evidence["report_size"] == 1184


def test_policy_without_a_tee(tmp_path):
    nothing = {"configfs_root": tmp_path, "sev_guest": tmp_path / "sev-guest"}
    assert tee.attest_run({"platform": "cpu", "run_id": RUN_ID}, **nothing) is None
    with pytest.raises(tee.AttestationError, match="runner.attestation: unattested"):
        tee.attest_run({"platform": "cvm", "run_id": RUN_ID}, **nothing)
    evidence = tee.attest_run({"platform": "cvm", "run_id": RUN_ID, "attestation": "unattested"}, **nothing)
    assert evidence["status"] == "unattested" and "no TEE report interface" in evidence["reason"]


def _record_with(tee_evidence) -> dict:
    return {"schema_version": 1, "run_id": RUN_ID, "experiment": "throughput", "preset": "tiny",
            "config": {}, "status": "ok", "message": None, "metrics": {}, "estimated": False,
            "system": {"platform": "Linux", "processor": "x", "cpu_count": 2, "python": "3.11", "libraries": {},
                       "gpu": None, "git_commit": None, "container_image": None, "hostname": "h",
                       "tee": tee_evidence},
            "started_at": "2026-11-30T10:00:00+00:00", "finished_at": "2026-11-30T10:01:00+00:00"}


def test_records_and_pages_show_the_evidence(tmp_path):
    configfs_tree(tmp_path, "sev_guest", snp_report())
    attested = tee.collect(RUN_ID, configfs_root=tmp_path, nonce=NONCE, entry="privbench")
    unattested = tee.attest_run({"platform": "cvm", "run_id": RUN_ID, "attestation": "unattested"},
                                configfs_root=tmp_path / "none", sev_guest=tmp_path / "none")
    for evidence in (attested, unattested, None):
        assert records.problems(_record_with(evidence)) == []
    assert records.problems(_record_with({"status": "attested", "type": "sev-snp", "verified": False}))
    rows = [aggregate.to_row(_record_with(e)) for e in (attested, unattested, None)]
    frame = pd.DataFrame(rows)
    label = dict(pages.system_rows(frame))["Confidential computing (TEE)"]
    assert "sev-snp: 1 run attested" in label
    assert "UNATTESTED: 1 run on" in label and "none for 1 run (" in label


TEE_HERE = (tee.CONFIGFS_ROOT / "tsm" / "report").is_dir() or tee.SEV_GUEST_DEVICE.exists()


@pytest.mark.skipif(TEE_HERE, reason="this machine is a confidential VM: the no-TEE behaviour cannot be shown")
def test_cvm_runs_without_a_tee_fail_unless_unattested_is_allowed(tmp_path):
    """The real worker on this machine (no TEE): an error record, or an unattested result."""
    cfg = studies.validate({
        "preset": "tiny", "experiments": ["throughput"], "platform": "cvm",
        "run": {"memory_budget_mb": 2048, "timeout_s": 120},
        "throughput": {"frameworks": ["jax"], "models": ["cnn"], "sizes": ["tiny"], "modes": ["standard"],
                       "batch_start": 2, "batch_cap": 2, "warmup_steps": 1, "timed_steps": 2,
                       "opacus_table_batch": 2}})
    spec = make_run_spec(next(iter(throughput.curves(cfg).values())), 2)

    refused = harness.run_isolated(spec, tmp_path / "required" / f"{RUN_ID}.json", {"attestation": "required"})
    assert refused["status"] == "error" and refused["system"]["tee"] is None
    assert refused["message"].startswith("AttestationError: platform 'cvm' needs TEE attestation evidence")
    assert "runner.attestation: unattested" in refused["message"]

    allowed = harness.run_isolated(spec, tmp_path / "unattested" / f"{RUN_ID}.json", {"attestation": "unattested"})
    assert allowed["status"] == "ok" and allowed["metrics"]["throughput_sps"] > 0
    assert allowed["system"]["tee"]["status"] == "unattested"
    frame = aggregate.build_table([tmp_path / "unattested" / f"{RUN_ID}.json"])
    assert "**UNATTESTED: 1 run on" in dict(pages.system_rows(frame))["Confidential computing (TEE)"]
