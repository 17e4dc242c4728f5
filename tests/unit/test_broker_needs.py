"""What a deployment's queues cost its RabbitMQ node, as ``eventfleet status`` states and warns it."""

from __future__ import annotations

from workers.admin.status import BrokerNeeds, ProjectionStatus, Report
from workers.cli.status import render


def test_a_deployment_declares_a_quorum_queue_per_partition_and_a_dlq_per_projection_three_handles_each() -> None:
    needs = BrokerNeeds(projections=5, partitions=16)
    assert (needs.quorum_queues, needs.file_handles, needs.warning) == (85, 255, None)
    assert needs.describe() == ("this deployment declares 85 quorum queues (5 projections x (16 partitions + 1 DLQ)), "
                                "~255 file handles of the broker; a node with the Debian default of 1,024 "
                                "descriptors has ~927")


def test_a_deployment_needing_more_than_half_a_default_nodes_handles_is_warned_about() -> None:
    needs = BrokerNeeds(projections=10, partitions=16)
    assert (needs.quorum_queues, needs.file_handles) == (170, 510)
    assert needs.warning == ("this deployment alone needs more than half of the file handles of a RabbitMQ node "
                             "with the default limit; past 927 the node stops answering: raise its limit "
                             "(docs/reference.md, \"RabbitMQ versions and the broker's limits\")")
    assert BrokerNeeds(projections=9, partitions=16).warning is None  # 459 handles: not more than half


def test_status_prints_the_arithmetic_below_the_outbox_and_the_warning_under_it() -> None:
    report = Report([ProjectionStatus(f"p{i}", "live", 0, 0, 0.0, 0, None) for i in range(10)], 0, 0.0, 16)
    lines = render(report).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("outbox: "))
    assert lines[at + 1] == f"broker: {report.broker.describe()}"
    assert lines[at + 2] == f"warning: {report.broker.warning}"
    assert report.to_json()["broker"] == {"quorum_queues": 170, "file_handles": 510, "default_node_handles": 927,
                                          "warning": report.broker.warning}


def test_a_worker_group_counts_its_partitions_once_and_the_projections_it_feeds_their_dlq_only() -> None:
    needs = BrokerNeeds(projections=5, partitions=16, groups=1, grouped=4)
    assert (needs.quorum_queues, needs.file_handles) == (16 + 5 + 16, 111)
    assert needs.describe() == ("this deployment declares 37 quorum queues (1 worker group x 16 partitions + "
                                "5 projections x 1 DLQ + 1 projection outside a group x 16 partitions), ~111 file "
                                "handles of the broker; a node with the Debian default of 1,024 descriptors has ~927")


def test_status_counts_the_groups_of_the_report_and_the_projections_their_queues_feed() -> None:
    rows = [ProjectionStatus("a", "live", 0, 0, 0.0, 0, 3, queue_groups=("x",)),
            ProjectionStatus("b", "live", 0, 0, 0.0, 0, 3, queue_groups=("x",)),
            ProjectionStatus("c", "live", 0, 0, 0.0, 0, 0)]
    report = Report(rows, 0, 0.0, 16, groups=("x", "y"))
    assert report.broker == BrokerNeeds(projections=3, partitions=16, groups=2, grouped=2)
    assert report.broker.quorum_queues == 2 * 16 + 3 + 16
