"""The target's window on retrieved instances (pure logic): the SCP is answered before the
listener's agent has stored an instance, so the final response must be corrected for those
it then did not store."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from pydicom.dataset import Dataset

from dimse_relay.target import RETRIEVE_WINDOW, _Retrieve, reconciled


def _status(code: int, completed: int, failed: int = 0) -> Dataset:
    status = Dataset()
    status.Status = code
    status.NumberOfCompletedSuboperations = completed
    status.NumberOfFailedSuboperations = failed
    status.NumberOfWarningSuboperations = 0
    return status


def _answered(code: int) -> Future[Dataset]:
    future: Future[Dataset] = Future()
    status = Dataset()
    status.Status = code
    future.set_result(status)
    return future


def test_nothing_lost_leaves_the_final_response_as_it_is() -> None:
    final = _status(0x0000, 5)
    assert reconciled(final, None, []) == (final, None)


def test_lost_instances_count_as_failed_and_success_becomes_warning() -> None:
    status, identifier = reconciled(_status(0x0000, 5), None, ["1.2.3", "1.2.4"])
    assert status.Status == 0xB000
    assert status.NumberOfCompletedSuboperations == 3
    assert status.NumberOfFailedSuboperations == 2
    assert identifier is not None
    assert list(identifier.FailedSOPInstanceUIDList) == ["1.2.3", "1.2.4"]


def test_lost_instances_join_the_scps_own_failed_list_and_status() -> None:
    scp_list = Dataset()
    scp_list.FailedSOPInstanceUIDList = "1.2.9"
    status, identifier = reconciled(_status(0xB000, 4, failed=1), scp_list, ["1.2.3"])
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (3, 2)
    assert identifier is not None
    assert list(identifier.FailedSOPInstanceUIDList) == ["1.2.9", "1.2.3"]
    assert scp_list.FailedSOPInstanceUIDList == "1.2.9", "the SCP's identifier is not changed"
    cancelled, _ = reconciled(_status(0xFE00, 1), None, ["1.2.3"])
    assert cancelled.Status == 0xFE00, "a cancel or failure keeps its own status"


def test_every_completed_instance_lost_is_a_failure_and_absent_counts_stay_absent() -> None:
    status, identifier = reconciled(_status(0x0000, 2), None, ["1.2.3", "1.2.4"])
    assert status.Status == 0xA702, "no sub-operation completed: Failure, as pynetdicom sends"
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (0, 2)
    bare = Dataset()
    bare.Status = 0x0000
    status, identifier = reconciled(bare, None, ["1.2.3"])
    assert status.Status == 0xB000
    assert "NumberOfCompletedSuboperations" not in status
    assert "NumberOfFailedSuboperations" not in status
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == "1.2.3"


def test_settle_keeps_at_most_the_window_outstanding_and_records_failures() -> None:
    retrieve = _Retrieve(op_id=1, reply="inbox")
    retrieve.outstanding.append(("1.1", _answered(0x0000)))
    retrieve.outstanding.append(("1.2", _answered(0xA700)))
    pending: Future[Dataset] = Future()
    retrieve.outstanding.append(("1.3", pending))
    retrieve.settle(RETRIEVE_WINDOW - 1, 1.0)
    # answered ones leave the window as soon as they are seen; the unanswered one stays
    assert [uid for uid, _ in retrieve.outstanding] == ["1.3"]
    assert retrieve.lost == ["1.2"]
    # before the final response: wait for every answer; silence counts as lost
    threading.Timer(0.1, lambda: pending.set_exception(TimeoutError())).start()
    retrieve.outstanding.append(("1.4", Future()))
    retrieve.settle(0, 0.5)
    assert not retrieve.outstanding
    assert retrieve.lost == ["1.2", "1.3", "1.4"]


def test_settle_blocks_while_the_window_is_full() -> None:
    retrieve = _Retrieve(op_id=1, reply="inbox")
    futures: list[Future[Dataset]] = [Future() for _ in range(RETRIEVE_WINDOW + 1)]
    for i, future in enumerate(futures):
        retrieve.outstanding.append((f"1.{i}", future))
    threading.Timer(0.1, lambda: futures[0].set_result(_answered(0x0000).result())).start()
    retrieve.settle(RETRIEVE_WINDOW, 5.0)  # returns once the oldest is answered
    assert len(retrieve.outstanding) == RETRIEVE_WINDOW
    assert not retrieve.lost
