"""Nothing lost, nothing silent (issue 8): safe --load / --save / --export-hf, a NaN that never reaches
the optimizer or a checkpoint, verified checkpoints, a full disk named, no process left behind.

Launch checks run in this process (no process group may be built). The runs use the tiny DSv3 of
tests/launch.py through torchrun:

  full_disk   world 1: saves iteration 2, then the disk "fills up" writing iteration 4
              (tests/enospc_driver.py)
  killed      world 2: saves iteration 2, then one rank is SIGKILLed; its checkpoint is also the
              one damaged on purpose (and loaded at world 2) below
  nan runs    tests/nan_driver.py: a NaN output on one rank in one micro-batch (world 2), an Inf
              gradient (world 1), NaN weights at save and at load (world 1)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch import TINY, launch
from megatron_dsv3.checkpoint import manifest
from megatron_dsv3.training import launcher as pretrain
from megatron_dsv3.training import safety
from megatron_dsv3.training.arguments import LaunchError

HERE = os.path.dirname(os.path.abspath(__file__))
TRACKER = "latest_checkpointed_iteration.txt"


# ----------------------------------------------------------------------------------------------
# Launch checks (no process group)
# ----------------------------------------------------------------------------------------------


def _prepare(*extra):
    interval = ["--save-interval", "2"] if "--save" in extra else []
    return pretrain.prepare(list(TINY) + ["--train-iters", "2", *interval, *extra])


def _fails(*extra) -> str:
    with pytest.raises(LaunchError) as info:
        _prepare(*extra)
    return str(info.value.code)


def _fake_checkpoint(root, iteration: int, with_manifest: bool = True, tracker: str | None = None):
    """A directory shaped like a saved checkpoint (files, manifest, tracker)."""
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(1000))
    (d / "metadata.json").write_text("{}")
    if with_manifest:
        manifest.write_manifest(str(d), manifest.hash_files(str(d), manifest.list_files(str(d))))
    (root / TRACKER).write_text(str(iteration) if tracker is None else tracker)
    return d


def test_export_hf_refuses_a_load_without_checkpoint(tmp_path, no_process_groups):
    """A missing, mistyped or empty --load (or one whose only save never finished) is refused before
    anything runs; nothing is exported."""
    out = tmp_path / "hf"
    partial = tmp_path / "partial"
    (partial / "iter_0000004").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for load, why in ((tmp_path / "typo", "does not exist"), (tmp_path / "empty", TRACKER),
                      (partial, "iter_0000004 there never completed")):
        msg = _fails("--load", str(load), "--export-hf", str(out))
        assert f"--export-hf: --load {load} holds no checkpoint" in msg and why in msg, msg
    assert not out.exists()
    with pytest.raises(SystemExit, match="no checkpoint was loaded from --load"):   # the run-time backstop
        safety._S.loaded = None
        safety.require_loaded_checkpoint(_prepare("--load", str(partial), "--allow-fresh-start"))


def test_load_without_checkpoint_needs_fresh_start_or_the_save_directory(tmp_path, no_process_groups, capsys):
    typo, other = tmp_path / "ckpt_typo", tmp_path / "ckpt"
    msg = _fails("--load", str(typo), "--save", str(other))
    assert f"--load {typo} holds no checkpoint (the directory does not exist)" in msg
    assert "--allow-fresh-start" in msg
    assert "--exit-on-missing-checkpoint" in _fails("--load", str(other), "--save", str(other),
                                                    "--exit-on-missing-checkpoint")
    capsys.readouterr()
    _prepare("--load", str(typo), "--save", str(other), "--allow-fresh-start")
    out = capsys.readouterr().out
    assert f"--load {typo} holds no checkpoint yet: training from scratch (--allow-fresh-start)" in out
    _prepare("--load", str(other), "--save", str(other))        # Megatron's auto-resume pattern
    assert "(--load = --save: the next launch resumes from it)" in capsys.readouterr().out


def test_save_holding_checkpoints_is_never_overwritten_without_resuming(tmp_path, no_process_groups):
    save = tmp_path / "ckpt"
    _fake_checkpoint(save, 4)
    before = sorted(p.name for p in save.iterdir())
    for extra, why in (([], "there is no --load"), (["--load", str(tmp_path / "x"), "--allow-fresh-start"],
                                                    f"--load is {tmp_path / 'x'}"),
                       (["--load", str(save), "--finetune"], "--finetune restarts at iteration 0")):
        msg = _fails("--save", str(save), *extra)
        assert f"--save {save} already holds checkpoints (latest: iteration 4)" in msg and why in msg, msg
    _prepare("--save", str(save), "--load", str(save))          # resuming from it is fine
    assert sorted(p.name for p in save.iterdir()) == before


@pytest.mark.parametrize("content, shown", [("abc\n", "'abc'"), ("", "nothing (empty file)"),
                                            ("-3", "'-3'")])
def test_damaged_tracker_is_a_launch_error_naming_the_file(tmp_path, no_process_groups, content, shown):
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 2, tracker=content)
    msg = _fails("--load", str(ckpt))
    assert f"{ckpt / TRACKER} holds {shown}, not an iteration number" in msg, msg
    assert "[2]" in msg                                  # the complete checkpoints it could point at


def test_tracker_pointing_nowhere_and_missing_manifest_are_launch_errors(tmp_path, no_process_groups):
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 2)
    (ckpt / TRACKER).write_text("6")
    assert f"the checkpoint of iteration 6 ({ckpt / 'iter_0000006'}) does not exist" in _fails("--load", str(ckpt))
    (ckpt / TRACKER).write_text("2")
    os.remove(ckpt / "iter_0000002" / manifest.MANIFEST_NAME)
    msg = _fails("--load", str(ckpt))
    assert f"{ckpt / 'iter_0000002' / manifest.MANIFEST_NAME} does not exist" in msg
    assert "--no-verify-checkpoint" in msg and "megatron_dsv3.checkpoint.manifest write" in msg
    _prepare("--load", str(ckpt), "--no-verify-checkpoint")


def test_save_directory_is_checked_at_launch(tmp_path, no_process_groups):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert f"--save {afile} exists and is not a directory" in _fails("--save", str(afile))
    assert f"cannot be created: {afile} is not a directory" in _fails("--save", str(afile / "ckpt"))
    _prepare("--save", str(tmp_path / "new" / "ckpt"))
    assert not (tmp_path / "new").exists()     # checked, not created


def test_step_guard_settings(no_process_groups):
    """Megatron's rerun state machine (one rank at a time, 'rescheduled on the same GPU') is replaced
    by the step guard; asking for it explicitly is refused; --async-save needs the manifest off."""
    args = _prepare()
    assert args.rerun_mode == "disabled" and args.check_for_nan_in_loss_and_grad is False
    assert "--rerun-mode" in _fails("--rerun-mode", "validate_results")
    assert "--async-save" in _fails("--async-save", "--save", "/tmp/x")


def test_megatron_exit_zero_after_an_error_becomes_one(tmp_path):
    """Megatron's checkpoint reader ends with a bare sys.exit() (exit code 0) on a damaged tracker;
    under the launcher that is exit code 1. A clean Megatron exit keeps its code."""
    from megatron.training import checkpointing

    bad = tmp_path / TRACKER
    bad.write_text("garbage")
    with pytest.raises(SystemExit) as info, safety.error_exits_nonzero():
        checkpointing.read_metadata(str(bad))
    assert info.value.code == 1
    clean = os.path.join(safety._megatron_root(), "training", "global_vars.py")   # the SIGTERM handler
    code = compile("def _graceful_shutdown():\n    raise SystemExit(0)\n", clean, "exec")
    scope = {}
    exec(code, scope)
    with pytest.raises(SystemExit) as info, safety.error_exits_nonzero():
        scope["_graceful_shutdown"]()
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info, safety.error_exits_nonzero():
        sys.exit(0)                                      # not Megatron's: untouched
    assert info.value.code == 0


def test_megatron_internals_relied_on_are_unchanged():
    from megatron_dsv3.compat.patches import apply, source_fingerprint, typing_override

    apply([typing_override.PATCH])
    assert {t: source_fingerprint(t) for t in safety.RELIES_ON} == safety.RELIES_ON


def test_manifest_names_every_kind_of_damage(tmp_path):
    d = tmp_path / "iter_0000001"
    d.mkdir()
    for name, size in (("a.distcp", 100_000), ("b.distcp", 50_000), ("metadata.json", 10)):
        (d / name).write_bytes(os.urandom(size))
    (d / "sub").mkdir()
    (d / "sub" / "x").write_bytes(b"x")
    manifest.write_manifest(str(d), manifest.hash_files(str(d), manifest.list_files(str(d))))
    assert sorted(os.listdir(d)) == ["a.distcp", "b.distcp", manifest.MANIFEST_NAME, "metadata.json", "sub"]
    assert manifest.verify(str(d)) == ([], 150_011)
    with open(d / "a.distcp", "r+b") as f:                # finite garbage, same size
        f.seek(4096)
        f.write(os.urandom(4096))
    os.truncate(d / "b.distcp", 20_000)
    os.remove(d / "metadata.json")
    (d / "extra").write_text("added later")
    problems = manifest.verify(str(d))[0] + manifest.verify(str(d), part=(1, 2))[0]
    kinds = {p.path: p.what for p in problems}
    assert kinds == {"a.distcp": "content", "b.distcp": "size", "metadata.json": "missing", "extra": "unlisted"}
    assert "truncated: 20000 bytes, the manifest says 50000" in [p.detail for p in problems if p.path == "b.distcp"][0]
    os.remove(d / manifest.MANIFEST_NAME)
    with pytest.raises(manifest.ManifestError, match="does not exist"):
        manifest.verify(str(d))
    (d / manifest.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(manifest.ManifestError, match="cannot be read"):
        manifest.verify(str(d))


def test_disk_full_is_recognised(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    enospc = OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter_0000004/__0_0.distcp")
    wrapped = CheckpointException("write", {0: _wrap_exception(enospc)})
    assert safety.disk_full(wrapped, str(tmp_path)) == "/ckpt/iter_0000004/__0_0.distcp"
    logged = ["Local worker 0 encountered an error: [Errno 28] No space left on device: '/c/f.distcp'"]
    assert safety.disk_full(RuntimeError("Worker failure: <class 'OSError'>"), str(tmp_path), logged) == "/c/f.distcp"
    writer = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
    assert safety.disk_full(writer, str(tmp_path)) is None                      # plenty of room here
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    assert safety.disk_full(writer, str(tmp_path)) == ""                        # 1 MiB left: full
    assert safety.disk_full(ValueError("other"), str(tmp_path)) is None


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def _driver(name: str, *spec: str) -> list[str]:
    return [os.path.join(HERE, name), *spec]


def _tracker(ckpt) -> str:
    return (ckpt / TRACKER).read_text().strip()


def _logged_iterations(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"\] iteration +(\d+)/", log)]


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("full_disk") / "ckpt"
    code, log = launch(1, TINY + ["--train-iters", "4", "--save", str(ckpt), "--save-interval", "2"],
                       entry=_driver("enospc_driver.py", "4"), torchrun=True)   # exit code through torchrun
    return ckpt, code, log


def test_full_disk_is_named_and_the_previous_checkpoint_stays_latest(full_disk):
    ckpt, code, log = full_disk
    assert code != 0, log[-3000:]
    assert "DSV3_TEST: disk full while writing" in log, log[-3000:]
    assert f"dsv3-pretrain: error: no space left on {ckpt} " in log, log[-3000:]
    assert "while writing the checkpoint of iteration 4" in log and "iter_0000004/__0_0.distcp" in log
    assert "The previous checkpoint (iteration 2) stays latest" in log
    assert _tracker(ckpt) == "2"
    assert not (ckpt / "iter_0000004" / manifest.MANIFEST_NAME).exists()


def test_saved_checkpoint_has_a_complete_manifest(full_disk):
    """Every file of the iteration directory is listed with its size and SHA-256 (the manifest was
    written after the shards and before the tracker file pointed at them); the run said how fast."""
    ckpt, _, log = full_disk
    d = str(ckpt / "iter_0000002")
    entries = manifest.read_manifest(d)
    assert sorted(entries) == manifest.list_files(d) and len(entries) >= 3
    assert manifest.verify(d)[0] == []
    m = re.search(r"checkpoint manifest .*iter_0000002/dsv3_manifest.json: (\d+) files, ([0-9.]+) MB hashed "
                  r"on 1 rank\(s\) in ([0-9.]+) s \((\d+) MB/s\)", log)
    assert m and int(m.group(1)) == len(entries), log[-3000:]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """2 ranks save iteration 2 and go on; rank 1 is SIGKILLed. Every process that descended from
    the run (ranks, data-loader workers, the checkpoint writer's Manager and resource tracker) must
    be gone a few seconds later."""
    import psutil

    ckpt = tmp_path_factory.mktemp("killed") / "ckpt"
    proc = launch(2, TINY + ["--global-batch-size", "8", "--train-iters", "1000", "--save", str(ckpt),
                             "--save-interval", "2"], popen=True)
    seen, deadline, family = "", time.time() + 400, []
    try:
        for line in proc.stdout:
            seen += line
            if re.search(r"\] iteration +3/", line):      # iteration 2's save is complete
                break
            assert time.time() < deadline, seen[-3000:]
        else:
            pytest.fail("the run ended before its first save:\n" + seen[-3000:])
        family = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in family]
        rank1 = [p for p in family if p.ppid() == proc.pid and p.environ().get("RANK") == "1"]
        assert len(rank1) == 1, commands
        rank1[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        alive = family
        while alive and time.time() - killed_at < 30:
            time.sleep(0.5)
            alive = [p for p in family if _alive(p)]
        gone_after = time.time() - killed_at
        survivors = [" ".join(p.cmdline()) for p in alive]
    finally:     # whatever is left (a survivor holds torchrun's output pipe open; a failed wait)
        try:
            family = family + psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return ckpt, commands, survivors, gone_after, proc.returncode, seen + rest


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_rank_leaves_no_process_behind(killed):
    ckpt, commands, survivors, gone_after, code, log = killed
    assert any("multiprocessing.spawn" in c for c in commands), commands     # the writer's Manager ran
    assert any("resource_tracker" in c for c in commands), commands
    assert not survivors, f"still running {gone_after:.0f} s after the kill: {survivors}"
    assert gone_after < 15
    assert code != 0
    assert _tracker(ckpt) in ("2", "4") and (ckpt / "iter_0000002" / manifest.MANIFEST_NAME).exists()


def test_damaged_checkpoint_is_refused_naming_each_file(killed, tmp_path):
    """4 KiB of finite garbage in one shard, another shard truncated, metadata.json deleted: a world-2
    load (each rank hashes a share of the files) names all three and loads nothing."""
    src = killed[0] / "iter_0000002"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt / "iter_0000002")
    (ckpt / TRACKER).write_text("2")
    shards = sorted(p for p in os.listdir(ckpt / "iter_0000002") if p.endswith(".distcp"))
    assert len(shards) == 2, shards
    garbage, truncated = (ckpt / "iter_0000002" / s for s in shards)
    with open(garbage, "r+b") as f:
        f.seek(os.path.getsize(garbage) // 2)
        f.write(b"\x3f" * 4096)                          # 0x3f3f3f3f: a finite float32
    size = os.path.getsize(truncated)
    os.truncate(truncated, size // 2)
    os.remove(ckpt / "iter_0000002" / "metadata.json")
    code, log = launch(2, TINY + ["--global-batch-size", "8", "--train-iters", "1000", "--load", str(ckpt)])
    assert code != 0
    assert "does not match its manifest" in log, log[-4000:]
    assert f"{garbage}: content changed since it was saved" in log
    assert f"{truncated}: truncated: {size // 2} bytes, the manifest says {size}" in log
    assert f"{ckpt / 'iter_0000002' / 'metadata.json'}: missing (listed in the manifest)" in log
    assert "nothing was loaded" in log and "loading distributed checkpoint" not in log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_flag_sees_every_nan_and_inf(dtype):
    """The step guard's one-reduction check: any NaN, +Inf, -Inf, or +Inf next to -Inf (whose sum is
    NaN) anywhere in the tensor raises the flag; finite tensors, large ones included, do not."""
    clean = torch.randn(4, 8, 16, dtype=torch.float64).to(dtype)
    assert int(safety.nonfinite_flag(clean)) == 0
    assert int(safety.nonfinite_flag(torch.full((1000,), 1e30, dtype=torch.float64).to(dtype))) == 0
    for values, where in [((float("nan"),), (1, 2, 3)), ((float("inf"),), (0, 0, 0)),
                          ((-float("inf"),), (3, 7, 15)), ((float("inf"), -float("inf")), (2, 5, 9))]:
        bad = clean.clone()
        flat = bad.view(-1)
        for i, v in enumerate(values):
            flat[(where[0] * 128 + where[1] * 16 + where[2] + 11 * i) % flat.numel()] = v
        assert int(safety.nonfinite_flag(bad)) == 1, (dtype, values)


def test_nan_in_one_rank_and_micro_batch_stops_every_rank_before_the_optimizer(tmp_path):
    """Decoder layer 2 outputs NaN in the 2nd micro-batch of step 3 on rank 1 only: both ranks stop
    (no hang), at the iteration the console would call 3, naming layer 2; no checkpoint of step 3;
    the message points at iteration 2's checkpoint."""
    ckpt = tmp_path / "ckpt"
    code, log = launch(2, TINY + ["--global-batch-size", "8", "--train-iters", "5", "--save", str(ckpt),
                                  "--save-interval", "1"],
                       entry=_driver("nan_driver.py", "forward", "3,2,1,2"), timeout=400)
    assert code != 0
    assert "DSV3_TEST: NaN injected into decoder layer 2, step 3, rank 1, micro-batch 2" in log, log[-3000:]
    assert "non-finite values (NaN/Inf) at iteration 3: the optimizer step was not applied" in log, log[-4000:]
    assert "forward: decoder layer 2 (of 4) is the first whose output is non-finite (rank(s) [1])" in log
    assert "loss: non-finite in 1 micro-batch(es) (rank(s) [1])" in log
    assert f"resume from the latest good checkpoint, iteration 2 in {ckpt}: run the same command with " \
           f"--load {ckpt}" in log
    assert max(_logged_iterations(log)) == 2
    assert _tracker(ckpt) == "2" and not (ckpt / "iter_0000003").exists()
    assert "rescheduled" not in log


def test_nonfinite_gradient_stops_the_step_naming_the_layer(tmp_path):
    """An Inf gradient entering decoder layer 3's output in step 2 (the forward stays finite)."""
    ckpt = tmp_path / "ckpt"
    code, log = launch(1, TINY + ["--train-iters", "4", "--save", str(ckpt), "--save-interval", "1"],
                       entry=_driver("nan_driver.py", "backward", "2,3"))
    assert code != 0
    assert "non-finite values (NaN/Inf) at iteration 2" in log, log[-4000:]
    assert "gradients: non-finite in 4 module(s); going backward (from the head) the first is decoder " \
           "layer 3 (of 4)" in log      # layers 3, 2, 1 and the embedding
    assert "forward:" not in log and "loss: non-finite" not in log
    assert max(_logged_iterations(log)) == 1 and _tracker(ckpt) == "1"


def test_nonfinite_weights_are_never_saved_and_refused_at_load(tmp_path):
    """Step 1's checkpoint is written with the check switched off (a NaN in decoder layer 2's output
    projection, as an older version could have saved it); at step 2 the same NaN is refused before
    anything is written; loading step 1's checkpoint is refused naming the tensor."""
    from nan_driver import WEIGHT

    ckpt = tmp_path / "ckpt"
    code, log = launch(1, TINY + ["--train-iters", "4", "--save", str(ckpt), "--save-interval", "1"],
                       entry=_driver("nan_driver.py", "weights", "1,2"))
    assert code != 0
    assert f"refusing to save the checkpoint of iteration 2: non-finite values in {WEIGHT} (1 of 4096 " \
           "elements NaN/Inf, rank 0). Nothing was written; the latest checkpoint stays iteration 1" in log, log[-4000:]
    assert _tracker(ckpt) == "1" and not (ckpt / "iter_0000002").exists()
    code, log = launch(1, TINY + ["--train-iters", "4", "--load", str(ckpt)])
    assert code != 0
    assert f"the checkpoint of iteration 1 in --load {ckpt} holds non-finite values in {WEIGHT} (1 of 4096 " \
           "elements NaN/Inf, rank 0)" in log, log[-4000:]
    assert "verified" in log and not _logged_iterations(log)


def test_hung_rank_ends_the_job_after_the_distributed_timeout(tmp_path):
    """Rank 1 stops inside step 2's forward; with --distributed-timeout-minutes 1 rank 0's next
    collective times out, the job exits non-zero within about a minute (under torchrun, which then
    ends the hung rank) and step 1's checkpoint stays the latest."""
    ckpt = tmp_path / "ckpt"
    started = time.time()
    code, log = launch(2, TINY + ["--global-batch-size", "8", "--train-iters", "4", "--save", str(ckpt),
                                  "--save-interval", "1", "--distributed-timeout-minutes", "1"],
                       entry=_driver("nan_driver.py", "hang", "2,1"), timeout=400, torchrun=True)
    took = time.time() - started
    assert code != 0, log[-3000:]
    assert "DSV3_TEST: rank 1 hangs in step 2" in log, log[-3000:]
    assert re.search(r"[Tt]imed? ?out", log), log[-3000:]
    assert 60 <= took < 240, took
    assert _tracker(ckpt) == "1"
