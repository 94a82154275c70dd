"""local-run's checkpoint sync behaves as SageMaker's: uploads, deletes, and survives folders vanishing."""

from __future__ import annotations

import shutil
import threading
import time

from spot_training.local.storage import CheckpointSync


def write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_new_and_changed_files_are_uploaded(tmp_path):
    source, target = tmp_path / "instance", tmp_path / "s3"
    write(source / "step-2" / "__0_0.distcp", "a")
    sync = CheckpointSync([source], target)
    sync.sync_once()
    assert (target / "step-2" / "__0_0.distcp").read_text() == "a"
    write(source / "step-2" / "__0_0.distcp", "bb")
    sync.sync_once()
    assert (target / "step-2" / "__0_0.distcp").read_text() == "bb"


def test_a_checkpoint_deleted_in_the_container_is_deleted_from_the_prefix_folders_included(tmp_path):
    source, target = tmp_path / "instance", tmp_path / "s3"
    for step in (2, 4):
        write(source / f"step-{step}" / "__0_0.distcp")
        write(source / f"step-{step}" / "COMPLETE.json")
    sync = CheckpointSync([source], target)
    sync.sync_once()
    shutil.rmtree(source / "step-2")
    sync.sync_once()
    assert sorted(p.name for p in target.iterdir()) == ["step-4"]


def test_one_instance_deleting_its_files_leaves_the_other_instances_files(tmp_path):
    first, second, target = tmp_path / "algo-1", tmp_path / "algo-2", tmp_path / "s3"
    write(first / "step-2" / "__0_0.distcp")
    write(second / "step-2" / "__1_0.distcp")
    sync = CheckpointSync([first, second], target)
    sync.sync_once()
    shutil.rmtree(second / "step-2")
    sync.sync_once()
    assert sorted(p.name for p in (target / "step-2").iterdir()) == ["__0_0.distcp"]


def test_the_sync_thread_survives_folders_pruned_while_it_scans(tmp_path):
    """The trainer creates and prunes step folders as fast as it can while the sync runs; the thread must
    keep running and end with exactly what the container holds."""
    source, target = tmp_path / "instance", tmp_path / "s3"
    source.mkdir()
    sync = CheckpointSync([source], target, period=0.0)
    sync.start()
    stop = time.monotonic() + 1.5
    step = 0
    while time.monotonic() < stop:
        step += 1
        for rank in range(4):
            write(source / f"step-{step}" / "nested" / f"__{rank}_0.distcp", str(step))
        if step > 2:
            shutil.rmtree(source / f"step-{step - 2}")
    assert sync._thread.is_alive(), "the sync thread died"
    sync.stop()
    sync.sync_once()
    assert sorted(p.name for p in target.iterdir()) == [f"step-{step - 1}", f"step-{step}"]


def test_stop_and_final_pass_do_not_race(tmp_path):
    source, target = tmp_path / "instance", tmp_path / "s3"
    write(source / "step-1" / "a")
    sync = CheckpointSync([source], target, period=0.0)
    sync.start()
    threads = [threading.Thread(target=sync.sync_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sync.stop()
    assert (target / "step-1" / "a").is_file()
