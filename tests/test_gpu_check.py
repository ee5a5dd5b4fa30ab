"""scripts/gpu_check.sh and what benchmarks/report.py derives from its stage files. The GPU run itself
happens on a GPU machine; here: every stage leaves its file even when stopped at its deadline, the
archive holds them, and the kernel table only marks a face verified when all of its checks passed."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

STAGE_FILES = ["env.json", "build.log", "smoke.jsonl", "sanitizer.txt", "bench.jsonl", "tests.xml", "report.md"]


def test_every_stage_file_is_written_when_stages_are_stopped_at_their_deadlines(tmp_path):
    out, stages = tmp_path / "out", tmp_path / "work" / "stages"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(OUT=str(out), MMFAST_GPU_STAGE_DIR=str(stages), GPU_CHECK_DRYRUN="1", PYTHON=sys.executable,
               MMFAST_GPU_DEADLINES="S0=3,S1=3,S2=4,S4=4,S5=3")
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = {s["stage"]: s for s in report.read_jsonl(stages / "stages.jsonl")}
    assert list(records) == ["S0", "S1", "S2", "S3", "S4", "S5", "report"]
    assert records["S2"]["killed"] and records["S4"]["killed"], records  # the smoke and bench stages cannot finish in 4 s
    for f in STAGE_FILES:
        assert (stages / f).stat().st_size > 0, f
    json.loads((stages / "env.json").read_text())
    for f in ("smoke.jsonl", "bench.jsonl"):
        rows = [json.loads(line) for line in (stages / f).read_text().splitlines()]
        assert rows, f
    ET.parse(stages / "tests.xml")  # a valid junit file even when pytest was stopped
    # what comes back from the device machine: at most 8 files, the archive holding every stage file
    back = [p for p in out.rglob("*") if p.is_file()]
    assert len(back) <= 8 and (out / "gpu_check.tgz") in back
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert set(STAGE_FILES) <= names
    summary = (stages / "summary.txt").read_text()
    assert "S2" in summary and "stopped at deadline" in summary and summary.strip() in r.stdout  # printed last


def _smoke(op, face, passed=True, dtype="bfloat16", direction="forward", **kw):
    return {"op": op, "face": face, "dtype": dtype, "shape": "s", "direction": direction, "passed": passed,
            "max_err": 1e-3, "bound": 2e-3, **kw}


def _bench(op, impl, ratio, work, dtype="bfloat16", **kw):
    return {"op": op, "impl": impl, "dtype": dtype, "ratio_to_eager": ratio, "work": work, "median_ms": 1.0,
            "case": "c", "mode": "fwd", **kw}


def test_kernel_table_verifies_only_faces_whose_every_check_passed():
    smoke = [_smoke("cross_entropy", "triton"), _smoke("cross_entropy", "triton", direction="backward"),
             _smoke("attention", "triton"), _smoke("attention", "triton", passed=False, direction="backward"),
             _smoke("attention", "cuda", error="RuntimeError: illegal memory access", passed=False),
             {"op": "concat_embed", "face": "cuda", "dtype": "bfloat16", "shape": "s", "direction": "forward",
              "skipped": "skipped: no GPU"}]
    rows = {(r["op"], r["backend"]): r for r in report.kernel_table_rows(smoke, [], "sm_90")}
    assert rows[("cross_entropy", "triton")]["verified"] and rows[("cross_entropy", "triton")]["checks"] == 2
    assert not rows[("attention", "triton")]["verified"]
    assert not rows[("attention", "cuda")]["verified"]
    assert "illegal memory access" in rows[("attention", "cuda")]["failed"][0]
    assert ("concat_embed", "cuda") not in rows  # skipped checks verify nothing


def test_kernel_table_speedups_are_per_bucket_and_the_slowest_case():
    smoke = [_smoke("cross_entropy", "triton")]
    bench = [_bench("cross_entropy", "mmfast-triton", 2.0, 16384 * 30522),
             _bench("cross_entropy", "mmfast-triton", 0.9, 16384 * 30522, mode="fwd+bwd"),
             _bench("cross_entropy", "mmfast-triton", 1.5, 64 * 237 * 768),
             _bench("cross_entropy", "eager", 1.0, 64 * 237 * 768),
             _bench("cross_entropy", "mmfast-triton", 50.0, 10, dryrun=True)]  # dry runs never count
    (row,) = report.kernel_table_rows(smoke, bench, "sm_90")
    assert row["speedup_vs_reference"] == {"large": 0.9, "medium": 1.5}


def test_report_from_stage_files_names_failures(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"gpu": {"name": "NVIDIA H200", "capability": "sm_90"},
                                                   "versions": {"torch": "2.11.0"}}))
    (tmp_path / "smoke.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _smoke("attention", "cuda", passed=False, max_err=0.5, bound=0.01), _smoke("attention", "triton")]) + "\n{cut")
    (tmp_path / "bench.jsonl").write_text(json.dumps(_bench("attention", "mmfast-triton", 1.3, 6_000_000)) + "\n")
    (tmp_path / "tests.xml").write_text('<testsuite><testcase classname="t" name="a"><failure message="boom"/>'
                                        '</testcase><testcase classname="t" name="b"/></testsuite>')
    (tmp_path / "stages.jsonl").write_text(json.dumps({"stage": "S2", "rc": 124, "seconds": 120, "deadline": 120,
                                                       "killed": True, "file": "smoke.jsonl", "placeholder": False}))
    summary = report.gpu_check_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| attention | cuda | bfloat16 | 0/1 | FAIL: s forward: max_err 0.5 > bound 0.01 |" in md
    assert "t::a: boom" in md and "stopped at deadline" in summary
    table = json.loads((tmp_path / "kernel_table.json").read_text())["verified"]
    assert [(r["backend"], r["verified"], r["arch"]) for r in table] == [("cuda", False, "sm_90"), ("triton", True, "sm_90")]
    assert table[1]["speedup_vs_reference"] == {"medium": 1.3}


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_s1_probes_every_library_of_the_carried_wheel():
    """The CUDA kernels are in the wheel's second library; a probe of `_C` alone finds none and S1
    rebuilds from source (what the first H200 run did)."""
    gpu_check = _gpu_check_module()
    libs = ["/w/mmfast/_C.abi3.so", "/w/mmfast/_C_cuda.abi3.so"]
    assert gpu_check.carried_extension_env(libs)["MMFAST_EXTENSION"].split(os.pathsep) == libs


def test_s1_probe_finds_the_cuda_kernels_of_a_prebuilt_wheel(tmp_path):
    """Needs a wheel built with CUDA kernels (scripts/gpu_prepare.sh) and a CUDA build of torch (no GPU)."""
    import torch
    import zipfile

    wheels = sorted((ROOT / ".wheels").glob("mmfast-*.whl"))
    if not wheels or torch.version.cuda is None:
        import pytest

        pytest.skip("no carried wheel in .wheels/ or torch without CUDA")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(tmp_path)
    libs = sorted(str(p) for p in (tmp_path / "mmfast").glob("_C*.so"))
    if not any("_C_cuda" in lib for lib in libs):
        import pytest

        pytest.skip(f"{wheels[-1].name} has no CUDA kernels")
    gpu_check = _gpu_check_module()
    probe = gpu_check._probe_extension(gpu_check.carried_extension_env(libs))
    assert probe["loaded"] and all(probe["cuda"].values()), probe


def _run_dir(path, started, smoke, bench=(), dryrun=False, kernel_sources=None):
    path.mkdir()
    (path / "env.json").write_text(json.dumps({"started": started, "dryrun": dryrun, "kernel_sources": kernel_sources,
                                               "gpu": {"name": "NVIDIA H200", "capability": "sm_90"}}))
    (path / "smoke.jsonl").write_text("".join(json.dumps(r) + "\n" for r in smoke))
    (path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    return path


def test_kernel_table_of_several_runs_takes_each_row_from_the_newest_run_that_checked_or_timed_it(tmp_path):
    """Short leases: the first H200 run verified Triton and timed the losses, the second ran the CUDA
    faces and timed attention only. A newer failure replaces an older pass; a newer untimed row keeps
    the older timing; dry runs add nothing."""
    first = _run_dir(tmp_path / "b-first", "2026-11-30 16:07:14 UTC",
                     [_smoke("attention", "triton"), _smoke("cross_entropy", "triton"), _smoke("concat_embed", "triton")],
                     [_bench("cross_entropy", "mmfast-triton", 1.2, 16384 * 30522),
                      _bench("attention", "mmfast-triton", 0.8, 6_000_000)])
    second = _run_dir(tmp_path / "a-second", "2026-11-30 16:17:09 UTC",
                      [_smoke("attention", "triton"), _smoke("attention", "cuda"), _smoke("cross_entropy", "triton"),
                       _smoke("concat_embed", "triton", passed=False)],
                      [_bench("attention", "mmfast-triton", 1.6, 6_000_000),
                       _bench("attention", "mmfast-cuda", 3.0, 6_000_000)])
    dry = _run_dir(tmp_path / "c-dry", "2026-11-30 17:00:00 UTC", [_smoke("attention", "cuda", passed=False)], dryrun=True)
    rows = {(r["op"], r["backend"]): r for r in report.merged_kernel_table([second, dry, first])}
    assert set(rows) == {("attention", "triton"), ("attention", "cuda"), ("cross_entropy", "triton"),
                         ("concat_embed", "triton")}
    att = rows[("attention", "triton")]
    assert att["speedup_vs_reference"] == {"medium": 1.6} and att["checked_in"] == att["timed_in"] == "a-second"
    ce = rows[("cross_entropy", "triton")]
    assert ce["verified"] and ce["checked_in"] == "a-second" and ce["timed_in"] == "b-first"
    assert ce["speedup_vs_reference"] == {"large": 1.2}
    assert not rows[("concat_embed", "triton")]["verified"]  # the newer run's failure wins
    assert rows[("attention", "cuda")]["verified"] and rows[("attention", "cuda")]["arch"] == "sm_90"


def test_kernel_table_of_several_runs_never_verifies_a_face_on_fewer_checks_than_were_planned(tmp_path):
    """A run stopped at S2's deadline leaves faces with some of their checks: the CUDA cross_entropy
    face ran 2 of the 4 its Triton twin ran; a partial re-check of a fully checked face keeps the
    full verdict (and a failure in it counts)."""
    checks = lambda face, n, **kw: [_smoke("cross_entropy", face, direction=f"d{i}", **kw) for i in range(n)]
    first = _run_dir(tmp_path / "first", "2026-11-30 16:07:14 UTC", checks("triton", 4) + checks("cuda", 4, dtype="float16"))
    second = _run_dir(tmp_path / "second", "2026-11-30 16:17:09 UTC",
                      checks("triton", 1) + checks("cuda", 2) + checks("cuda", 1, dtype="float16", passed=False))
    rows = {(r["backend"], r["dtype"]): r for r in report.merged_kernel_table([first, second])}
    assert rows[("triton", "bfloat16")]["verified"] and rows[("triton", "bfloat16")]["checks"] == 4
    assert rows[("triton", "bfloat16")]["checked_in"] == "first+second"
    assert not rows[("cuda", "bfloat16")]["verified"]
    assert "only 2 of the 4 checks ran" in rows[("cuda", "bfloat16")]["failed"][-1]
    assert not rows[("cuda", "float16")]["verified"]  # the partial re-check failed


def test_kernel_table_never_merges_runs_of_other_kernels(tmp_path):
    """env.json records a fingerprint of csrc/ and mmfast/triton/: a run of older kernels says nothing
    about the newest run's; a run from before fingerprints were recorded (None) still counts."""
    old = _run_dir(tmp_path / "old", "2026-11-30 10:00:00 UTC", [_smoke("attention", "cuda")], kernel_sources="aaaa")
    legacy = _run_dir(tmp_path / "legacy", "2026-11-30 11:00:00 UTC", [_smoke("cross_entropy", "triton")])
    new = _run_dir(tmp_path / "new", "2026-11-30 12:00:00 UTC", [_smoke("concat_embed", "cuda")], kernel_sources="bbbb")
    rows = {(r["op"], r["backend"]): r for r in report.merged_kernel_table([old, legacy, new])}
    assert set(rows) == {("cross_entropy", "triton"), ("concat_embed", "cuda")}
    assert rows[("concat_embed", "cuda")]["kernel_sources"] == "bbbb"


def test_kernel_sources_fingerprint_follows_the_kernels_only(tmp_path):
    gpu_check = _gpu_check_module()
    for rel, text in (("csrc/cuda/attention.cu", "a"), ("mmfast/triton/attention.py", "b"),
                      ("mmfast/triton_attention_configs.json", "{}"), ("mmfast/ops/attention.py", "c")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    first = gpu_check.kernel_sources_fingerprint(tmp_path)
    (tmp_path / "mmfast/ops/attention.py").write_text("changed glue")
    (tmp_path / "mmfast/triton/__pycache__").mkdir()
    (tmp_path / "mmfast/triton/__pycache__/attention.pyc").write_text("bytecode")
    assert gpu_check.kernel_sources_fingerprint(tmp_path) == first
    (tmp_path / "csrc/cuda/attention.cu").write_text("a kernel changed")
    assert gpu_check.kernel_sources_fingerprint(tmp_path) != first
    assert len(gpu_check.kernel_sources_fingerprint()) == 16  # the repository's own


def test_tests_log_counts_what_pytest_ran_before_it_was_stopped(tmp_path):
    """pytest stopped at S5's deadline writes no junit file; -v lines in tests.log still say what ran
    (the first H200 run: 230 Triton cases passed, 230 CUDA cases failed for want of the CUDA library)."""
    log = tmp_path / "tests.log"
    log.write_text("tests/test_a.py::test_x[cuda] \n"
                   "[gw2] [ 64%] PASSED tests/test_a.py::test_x[triton] \n"
                   "[gw1] [ 64%] FAILED tests/test_a.py::test_x[cuda] \n"
                   "tests/test_b.py::test_y PASSED                                [ 70%]\n"
                   "tests/test_b.py::test_z SKIPPED (needs two GPUs)              [ 71%]\n"
                   "FAILED tests/test_a.py::test_x[cuda] - RuntimeError: boom\n")  # pytest's short summary repeats it
    t = report.tests_log_summary(log)
    assert (t["tests"], t["failures"], t["skipped"]) == (4, 1, 1)
    assert t["failed"] == ["tests/test_a.py::test_x[cuda]: FAILED (tests.log)"]


def test_gpu_check_refuses_an_unknown_face_in_one_line():
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MMFAST_GPU_FACES": "cuda,tritn"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "MMFAST_GPU_FACES" in r.stderr and "'cuda,tritn'" in r.stderr


def _gpu_smoke_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_concat_embed_dropout_mask_check_passes_a_correct_face_in_half_precision(tmp_path):
    """The first H200 run failed the Triton face's fp16/bf16 dropout mask check: about 1e-4 of the
    kept elements are exactly 0 (feature + type embedding cancel), and the check took them for
    dropped ones. The CPU face, correct, failed it on the CPU too; the check now passes it."""
    import torch

    smoke = _gpu_smoke_module()
    rows = tmp_path / "smoke.jsonl"
    checker = smoke.Checker(smoke.Jsonl(rows), "concat_embed")
    for dtype in (torch.float16, torch.bfloat16):
        feats = [smoke.testing.randn(4, L, 768, dtype=dtype, seed=L) for L in (40, 197)]
        te = smoke.testing.randn(2, 768, dtype=dtype, seed=7)
        smoke.concat_embed_dropout(checker, "cpu", dtype, feats, te)
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    mask = [r for r in lines if r["direction"] == "dropout_fwd_bwd_mask"]
    assert len(mask) == 2 and all(r["passed"] for r in mask), mask
    assert all(0.09 < r["dropped"] < 0.11 for r in mask), mask


def test_update_table_refuses_dry_runs_and_leaves_the_table(tmp_path):
    dry = _run_dir(tmp_path / "dry", "2026-11-30 17:00:00 UTC", [_smoke("attention", "cuda")], dryrun=True)
    table = ROOT / "mmfast" / "kernel_table.json"
    before = table.read_text()
    r = subprocess.run([sys.executable, "benchmarks/report.py", "--stages", str(dry), "--update-table"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "none of" in r.stderr and "GPU run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and table.read_text() == before
