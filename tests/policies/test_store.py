"""Hot reload: a changed file swaps in atomically; an invalid one keeps the last good policies."""

from __future__ import annotations

import logging
import os
import time

import pytest

from edgecatch.observation import Detection, Observation
from edgecatch.policies import ConfigError, PolicyStore

T0 = 1_795_132_800.0

GOOD = """version: 1
policies:
  - name: low
    confidence_below: 0.5
    limits: {per_minute: 1}
"""
BETTER = GOOD.replace("0.5", "0.8").replace("name: low", "name: low") + """  - name: all
    random: 1.0
"""
BROKEN = GOOD.replace("confidence_below", "confidence_bellow")


def write(path, text):
    path.write_text(text)
    # Same-second rewrites of the same size must still be noticed: bump mtime explicitly.
    stamp = time.time_ns() + int(1e9) * write.count
    write.count += 1
    os.utime(path, ns=(stamp, stamp))


write.count = 1


def obs(confidence: float) -> Observation:
    return Observation(model="m", detections=(Detection("box", confidence, (0, 0, 1, 1)),))


@pytest.fixture
def outcomes():
    return []


@pytest.fixture
def store(tmp_path, outcomes):
    path = tmp_path / "policies.yaml"
    write(path, GOOD)
    return PolicyStore(path, clock=lambda: T0, on_reload=outcomes.append, settle_seconds=0)


def test_invalid_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BROKEN)
    with pytest.raises(ConfigError, match="confidence_bellow"):
        PolicyStore(path)


def test_unchanged_file_is_not_reloaded(store, outcomes):
    assert store.check() is False
    os.utime(store.path)  # touched, same content
    assert store.check() is False
    assert outcomes == []


def test_changed_file_swaps_in_new_policies(store, outcomes):
    before = store.current
    assert not before.evaluate(obs(0.6), now=T0).selected
    write(store.path, BETTER)
    assert store.check() is True
    assert store.current is not before
    assert store.current.policy_names == ("low", "all")
    assert store.current.evaluate(obs(0.6), now=T0).policy == "low"
    assert outcomes == ["success"]


def test_invalid_reload_keeps_the_last_good_policies_and_logs(store, outcomes, caplog):
    good = store.current
    write(store.path, BROKEN)
    with caplog.at_level(logging.ERROR, logger="edgecatch.policies"):
        assert store.check() is False
    assert store.current is good
    assert outcomes == ["failure"]
    assert "keeping the last good policies" in caplog.text
    assert "policies[0].confidence_bellow: unknown key" in caplog.text
    assert "confidence_bellow" in str(store.last_error)
    # Fixing the file recovers.
    write(store.path, BETTER)
    assert store.check() is True and store.last_error is None
    assert outcomes == ["failure", "success"]


@pytest.mark.parametrize("how", ["undone", "deleted and restored"])
def test_a_broken_edit_undone_clears_the_failure(store, outcomes, how):
    good = store.current
    if how == "undone":
        write(store.path, BROKEN)
    else:
        store.path.unlink()
    assert store.check() is False and store.last_error is not None
    write(store.path, GOOD)  # the very text in force: nothing to swap in, but the alarm must clear
    assert store.check() is False
    assert store.current is good and store.last_error is None
    assert outcomes == ["failure", "success"]


def test_deleted_file_keeps_the_last_good_policies(store, outcomes):
    good = store.current
    store.path.unlink()
    assert store.check() is False
    assert store.current is good and outcomes == ["failure"]


def test_budgets_carry_over_a_reload(store):
    assert store.current.evaluate(obs(0.1), now=T0).policy == "low"
    write(store.path, BETTER)
    store.check()
    decision = store.current.evaluate(obs(0.1), now=T0 + 1)
    assert decision.limited == ("low",) and decision.policy == "all"


def test_background_poller_picks_up_a_change(store, outcomes):
    store._poll_interval = 0.02
    store.start()
    try:
        write(store.path, BETTER)
        deadline = time.monotonic() + 10
        while store.current.policy_names != ("low", "all") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        store.stop()
    assert store.current.policy_names == ("low", "all")
    assert outcomes == ["success"]


def test_atomic_replace_by_rename_is_noticed(store):
    # Editors and Kubernetes ConfigMaps replace files by renaming a new one over them.
    new = store.path.with_suffix(".tmp")
    new.write_text(BETTER)
    os.replace(new, store.path)
    assert store.check() is True


def test_a_kubernetes_configmap_update_reloads_through_the_config_file(tmp_path):
    """As kubelet updates a ConfigMap volume: each key is a link `key -> ..data/key`, `..data` links
    to a timestamped folder, and an update renames a new `..data` link over it and deletes the old
    folder. Relative paths in the config must follow `..data` (the sidecar's loader and the
    plugin's alike), so that every later update reloads."""
    import shutil

    from edgecatch.config import load_config
    from edgecatch.integrations.triton.sidecar import load_sidecar_config

    mount = tmp_path / "etc-edgecatch"
    mount.mkdir()
    config = f"policies: policies.yaml\ndelivery: {{spool_dir: {tmp_path / 'spool'}}}\n"

    def publish(version: int, policy_name: str) -> None:
        folder = mount / f"..2026_11_24_00_00_0{version}.{version:09d}"
        folder.mkdir()
        (folder / "edgecatch.yaml").write_text(config)
        (folder / "policies.yaml").write_text(f"version: 1\npolicies:\n  - name: {policy_name}\n    random: 1.0\n")
        old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
        os.symlink(folder.name, mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        for key in ("edgecatch.yaml", "policies.yaml"):
            if not (mount / key).is_symlink():
                os.symlink(f"..data/{key}", mount / key)
        if old:
            shutil.rmtree(mount / old)

    publish(1, "first")
    for loaded in (load_config(mount / "edgecatch.yaml"), load_sidecar_config(mount / "edgecatch.yaml")[0]):
        assert loaded.policies == mount / "policies.yaml"
    store = PolicyStore(load_config(mount / "edgecatch.yaml").policies, poll_interval=0, settle_seconds=0)
    for version, name in ((2, "second"), (3, "third")):
        publish(version, name)
        store.check()
        assert store.current.policy_names == (name,) and store.last_error is None


def test_a_file_still_being_written_is_read_once_it_has_settled(tmp_path, outcomes):
    """Rewritten in place in several writes, a policy file can be caught half written, and a prefix
    may parse (here: the first policy without the second, and without the limits that follow): it
    is read only once it has not changed for settle_seconds."""
    path = tmp_path / "policies.yaml"
    write(path, GOOD)
    store = PolicyStore(path, on_reload=outcomes.append, settle_seconds=0.5)
    with open(path, "w") as file:  # truncated, then the first part written
        file.write(BETTER[:BETTER.index("  - name: all")])
    assert store.check() is False and outcomes == []  # just changed: not read yet
    with open(path, "a") as file:
        file.write(BETTER[BETTER.index("  - name: all"):])
    assert store.check() is False
    old = time.time() - 1
    os.utime(path, (old, old))  # as if the writer had finished a second ago
    assert store.check() is True
    assert store.current.policy_names == ("low", "all") and outcomes == ["success"]
    # Stamped ahead of this host's clock (a shared volume's server): read once it stood still for
    # settle_seconds by this host's clock.
    write(path, GOOD)
    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))
    assert store.check() is False and store.check() is False
    time.sleep(0.6)
    assert store.check() is True and store.current.policy_names == ("low",)


def test_a_folder_or_unreadable_file_at_start_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read: Is a directory"):
        PolicyStore(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read"):
        PolicyStore(tmp_path / "latin1.yaml")


def test_a_process_started_while_the_file_is_invalid_starts_with_the_last_good_policies(tmp_path, outcomes):
    """A BentoML worker replacing a killed one, or a restarted pod, while ops' last edit is broken:
    it starts with what the running processes keep (saved by the last good load), says so, and
    picks up the fixed file. Without a saved copy (or with one of another file) it refuses."""
    path = tmp_path / "policies.yaml"
    saved = tmp_path / "spool" / "run" / "last-good-policies.yaml"
    write(path, GOOD)
    PolicyStore(path, last_good=saved, settle_seconds=0)
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    write(path, BROKEN)
    restarted = PolicyStore(path, last_good=saved, on_reload=outcomes.append, settle_seconds=0)
    assert restarted.current.policy_names == ("low",) and "confidence_bellow" in str(restarted.last_error)
    assert restarted.check() is False  # nothing changed since
    write(path, BETTER)
    assert restarted.check() is True and restarted.last_error is None and outcomes == ["success"]
    assert saved.read_text().endswith(BETTER)  # the new good text is what a next start would use
    write(path, BROKEN)
    with pytest.raises(ConfigError, match="confidence_bellow"):
        PolicyStore(path)  # no saved copy
    other = tmp_path / "other.yaml"
    write(other, BROKEN)
    with pytest.raises(ConfigError, match="confidence_bellow"):
        PolicyStore(other, last_good=saved)  # a copy of another file is not used
