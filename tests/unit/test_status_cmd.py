"""`taskrun status` as people read it: who leads, the epoch, each control plane's role."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from taskrun.cli.status_cmd import ClusterStatus, ControlPlaneInfo, status_doc, status_text

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def status(leader: str) -> ClusterStatus:
    planes = [
        ControlPlaneInfo(
            "cp-a",
            "cp1:50051",
            "cp1",
            10,
            "0.1.0",
            NOW - timedelta(hours=1),
            0.2,
            leader == "cp-a",
            ["worker-1", "worker-2"],
        ),
        ControlPlaneInfo(
            "cp-b",
            "cp2:50051",
            "cp2",
            11,
            "0.1.0",
            NOW - timedelta(minutes=5),
            0.4,
            leader == "cp-b",
            [],
        ),
    ]
    return ClusterStatus(
        store="postgresql",
        database="db:5432/taskrun",
        leader_id=leader,
        leader_address="cp1:50051" if leader == "cp-a" else "",
        leader_since=NOW - timedelta(minutes=30) if leader else None,
        epoch=7,
        lease_seconds_left=1.5,
        answered_by="cp-b",
        control_planes=planes,
    )


def test_the_table_names_the_leader_its_epoch_and_each_role_with_its_workers() -> None:
    text = status_text(status("cp-a"), NOW)
    assert "cp-a at cp1:50051" in text and "7" in text and "postgresql db:5432/taskrun" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("cp-")}
    assert "leader" in rows["cp-a"] and "worker-1, worker-2" in rows["cp-a"]
    assert "standby" in rows["cp-b"]


def test_no_leader_is_said_so() -> None:
    text = status_text(status(""), NOW)
    assert "none" in text.splitlines()[1]
    doc = status_doc(status(""))
    assert doc["leader"] is None and [p["role"] for p in doc["control_planes"]] == [
        "standby",
        "standby",
    ]
