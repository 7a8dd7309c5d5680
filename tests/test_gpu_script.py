"""tools/gpu.sh, the one-call GPU validation script: its structure, its time budgets and what it leaves in
the output folder (the device tool returns at most 8 files from there, no deeper than two folders), plus a
dry-run of its cheapest stage here on the CPU."""
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu.sh")
# what issue 16 asks one call to do, as stage names of the script
REQUIRED = ["env", "setup", "tests_gpu", "sanitize", "tests", "tune", "bench", "steps"]
CALL_LIMIT_S = 9 * 60


def _script() -> str:
    with open(SCRIPT) as f:
        return f.read()


def _run(*args, env=None, timeout=60):
    full = dict(os.environ, **(env or {}))
    full.pop("STAGES", None)
    full.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def test_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_stage_has_a_body_and_a_budget_within_one_call():
    r = _run("--list")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    limit = next(int(v) for name, v, _ in rows if name == "total_limit")
    assert limit <= CALL_LIMIT_S
    stages = {name: (int(v), place) for name, v, place in rows if place != "group" and name != "total_limit"}
    groups = {name: int(v) for name, v, place in rows if place == "group"}
    names = list(stages)
    assert [n for n in names if n in REQUIRED] == REQUIRED, f"stages missing or out of order: {names}"
    for n in REQUIRED:
        assert stages[n][0] > 0, f"stage {n} has no budget of its own"
    # serial stages add up; a group's lanes run side by side, each lane within the group's budget
    lanes: dict = {}
    for n, (v, place) in stages.items():
        if place != "-":
            assert place.split(".")[0] in groups, f"stage {n} in an unknown group {place}"
            lanes[place] = lanes.get(place, 0) + v
    for lane, total in lanes.items():
        assert total <= groups[lane.split(".")[0]], f"lane {lane} needs {total} s, more than its group"
    wall = sum(v for v, place in stages.values() if place == "-") + sum(groups.values())
    assert wall <= CALL_LIMIT_S - 8, (wall, rows)  # 8 s stay for the summary and the packing
    text = _script()
    for n in names:
        assert re.search(rf"^stage_{n}\(\) \{{", text, re.M), f"no body for stage {n}"
    # the tuning sweep writes the table the benchmarks then read; nothing timed runs beside the checks
    assert names.index("tune") < names.index("bench")
    for n in ("tune", "bench", "steps", "ncu"):
        assert stages[n][1] == "-", f"{n} is timed and must run alone"


def test_what_each_stage_runs():
    text = _script()
    for needle in ["tests/test_large_gpu.py", "-k sync", "mmkernels tune", "--repeats 3 --l2 cold,warm",
                   "overhead", "vit_step", 'mode="update"', "compute-sanitizer --tool memcheck",
                   "modality_scores band_energy", "PIP_NO_INDEX=1", "tools/setup_env.sh", "timeout -k 5"]:
        assert needle in text, f"tools/gpu.sh no longer contains {needle!r}"


def test_output_folder_holds_at_most_eight_files():
    names = set(re.findall(r'"\$OUT/([A-Za-z0-9_.\-]+)', _script()))
    names -= {"logs", "dry_results"}  # removed (packed) before the call returns
    assert names, "no output files found"
    assert len(names | {"tuned_<device>.json"}) <= 8, names
    assert {"summary.txt", "env.txt", "console.log", "logs.tgz", "results.tgz"} <= names


def test_driver_skips_a_stage_without_time_and_packs_its_logs(tmp_path):
    out = tmp_path / "out"
    r = _run("--dry-run", str(out), env={"STAGES": "env", "BUDGET_env": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^env +skipped ", summary, re.M), summary
    assert sorted(os.listdir(out)) == ["console.log", "logs.tgz", "summary.txt"]
    with tarfile.open(out / "logs.tgz") as t:
        assert "logs/.start" in t.getnames()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the script targets the Linux device machine")
def test_dry_run_of_the_env_stage(tmp_path):
    out = tmp_path / "out"
    r = _run("--dry-run", str(out), env={"STAGES": "env"}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^env +ok +0 ", summary, re.M), summary
    env = (out / "env.txt").read_text()
    assert "mode: dry-run" in env and re.search(r"^torch: \d", env, re.M), env
    with tarfile.open(out / "logs.tgz") as t:
        assert "logs/env.log" in t.getnames()
    assert len(os.listdir(out)) <= 8
