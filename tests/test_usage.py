"""Usage per tenant and task: counted on the Predict path, stored summarised, reported by the Admin API
and `headserve usage`, never as metric labels (tests/test_metrics.py checks that side)."""

from __future__ import annotations

import json

import grpc
import pytest
from conftest import TINY_TEXT, Client, make_settings, make_tenant, text_examples

from service.cli import main
from service.gen import headserve_pb2 as pb
from service.server import build_server

TOPICS = {"sports": ["A late goal won the match.", "The team trained in the rain."],
          "cooking": ["Simmer the sauce slowly.", "Knead the dough for ten minutes."]}


def test_usage_is_counted_stored_reported_and_goes_with_its_task(tmp_path, capsys):
    settings = make_settings(tmp_path, builtin_backbones=[], auth="api_key", usage_flush_seconds=0.2)
    running = build_server(settings)
    try:
        who, other = make_tenant(running), make_tenant(running)
        ops = make_tenant(running, scopes=("admin",))
        client, admin = Client(running.address, who.api_key), Client(running.address, ops.api_key)
        for task_id in ("busy", "quiet"):
            client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT,
                                                        examples=text_examples(TOPICS)))
            assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
        for _ in range(3):
            client.stub.Predict(pb.PredictRequest(task_id="busy", inputs=[pb.Input(text=t) for t in "abcd"]))
        client.stub.Predict(pb.PredictRequest(task_ids=["busy", "quiet"], inputs=[pb.Input(text="x")]))
        with pytest.raises(grpc.RpcError):  # refused requests are not usage
            client.stub.Predict(pb.PredictRequest(task_id="busy", inputs=[]))
        running.app.usage.flush()
        report = admin.admin.GetUsage(pb.GetUsageRequest(tenant=who.tenant_id))
        rows = {t.task_id: (t.requests, t.inputs) for t in report.tasks}
        assert rows == {"busy": (4, 13), "quiet": (1, 1)}
        assert [t.task_id for t in report.tasks] == ["busy", "quiet"] and (report.requests, report.inputs) == (5, 14)
        assert all(t.last_used_ms > 0 for t in report.tasks)
        assert not admin.admin.GetUsage(pb.GetUsageRequest(tenant=other.tenant_id)).tasks
        with pytest.raises(grpc.RpcError) as err:  # a tenant's own key is not an admin key
            client.admin.GetUsage(pb.GetUsageRequest(tenant=who.tenant_id))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        assert main(["usage", who.tenant_id, "--address", running.address, "--api-key", ops.api_key,
                     "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["requests"], shown["inputs"]) == (5, 14) and shown["tasks"][0]["task_id"] == "busy"

        client.stub.DeleteTask(pb.DeleteTaskRequest(task_id="quiet"))
        client.stub.Predict(pb.PredictRequest(task_id="busy", inputs=[pb.Input(text="y")]))
        client.close()
        admin.close()
    finally:
        running.stop()  # flushes what was counted since
    assert main(["usage", who.tenant_id, "--data-dir", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(t["task_id"], t["requests"], t["inputs"]) for t in shown["tasks"]] == [("busy", 5, 14)]
