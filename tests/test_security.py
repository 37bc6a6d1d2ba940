"""Tenants, API keys, scopes, quotas and the request pipeline, through a real server with auth on.

Every method of every service the server registers (found through reflection, not a hand list) is tried
without a key and with keys of each scope; a second tenant aims every RPC at the first tenant's task, job,
version and export; keys are revoked and expire; quotas and rates are hit and recover.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import pytest
from conftest import TOPICS, Client, make_tenant, text_examples, unique_id
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import pipeline
from service.cli import main
from service.client import open_channel
from service.config import Settings
from service.gen import headserve_pb2 as pb
from service.server import check_exposure
from service.tenants import TenantAdmin

HEALTH = "grpc.health.v1.Health"
MINUTE_TOPICS = {label: texts[:3] for label, texts in TOPICS.items()}


@pytest.fixture(scope="module")
def registered(server, tenant) -> dict[str, object]:
    """Full method name -> method descriptor, for every method of every service the server lists."""
    channel = open_channel(server.address, api_key=tenant.api_key)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    channel.close()
    pool = descriptor_pool.Default()
    methods = {}
    for service in listed.list_services_response.service:
        for method in pool.FindServiceByName(service.name).methods:
            methods[f"/{service.name}/{method.name}"] = method
    return methods


def call(channel: grpc.Channel, name: str, method, timeout: float = 10) -> grpc.StatusCode:
    """Calls `name` with an empty request message (empty bytes parse as any message); returns the code."""
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    kind = kinds[(method.client_streaming, method.server_streaming)]
    rpc = kind(name, request_serializer=lambda m: m, response_deserializer=lambda b: b)
    request = iter([b""]) if method.client_streaming else b""
    try:
        response = rpc(request, timeout=timeout)
        if method.server_streaming:
            for _ in response:
                break
            response.cancel()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def key_channel(server, api_key: str | None) -> grpc.Channel:
    return open_channel(server.address, api_key=api_key)


def test_the_pipeline_names_a_scope_for_every_registered_method(registered):
    """Deny by default, and nothing forgotten: each method the server serves has a scope in the table."""
    assert {name for name in registered if not name.startswith(f"/{HEALTH}/")} <= set(pipeline.METHOD_SCOPES)
    assert {"/headserve.v1.HeadServe/Predict", "/headserve.v1.Admin/CreateKey"} <= set(registered)


def test_every_method_without_a_key_is_unauthenticated_except_health(server, registered):
    channel = key_channel(server, None)
    try:
        for name, method in registered.items():
            if name == f"/{HEALTH}/Watch":
                continue  # a stream that never ends; Check covers Health
            code = call(channel, name, method)
            if name.startswith(f"/{HEALTH}/"):  # open for probes (List may be unimplemented, never INTERNAL)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED), (name, code)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code)
    finally:
        channel.close()


@pytest.mark.parametrize("scopes", [("predict",), ("train",), ("admin",)])
def test_every_method_outside_the_keys_scopes_is_permission_denied(server, registered, scopes):
    who = make_tenant(server, scopes=scopes)
    granted = {"predict": {"predict"}, "train": {"predict", "train"}, "admin": {"admin"}}[scopes[0]]
    channel = key_channel(server, who.api_key)
    try:
        for name, method in registered.items():
            scope = pipeline.scope_of(name)
            if scope in (pipeline.OPEN, pipeline.ANY) or scope in granted:
                continue
            assert call(channel, name, method) == grpc.StatusCode.PERMISSION_DENIED, name
        # Reflection needs a key, of any scope.
        assert call(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                    registered["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]) \
            == grpc.StatusCode.OK
    finally:
        channel.close()


@pytest.mark.parametrize("metadata, says", [
    ([("authorization", "Basic dXNlcjpwYXNz")], "malformed authorization"),
    ([("authorization", "Bearer ")], "malformed authorization"),
    ([("authorization", "Bearer not-a-key")], "malformed API key"),
    ([("authorization", "Bearer hsk_0123456789ab_" + "A" * 43)], "not valid"),
])
def test_bad_keys_are_unauthenticated(server, metadata, says):
    channel = grpc.insecure_channel(server.address)
    try:
        from service.gen import headserve_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.HeadServeStub(channel).ListTasks(pb.ListTasksRequest(), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and says in err.value.details()
    finally:
        channel.close()


def test_a_wrong_secret_for_a_real_key_id_is_unauthenticated(server, tenant):
    key_id = tenant.api_key.split("_")[1]
    forged = f"hsk_{key_id}_" + "B" * 43
    client = Client(server.address, forged)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in err.value.details()
    finally:
        client.close()


# --- two tenants ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_tenants(server):
    """Tenant A with a trained task `only-a` and a task `spam`; tenant B with its own task `spam`."""
    a, b = make_tenant(server), make_tenant(server)
    ca, cb = Client(server.address, a.api_key), Client(server.address, b.api_key)
    ca.stub.CreateTask(pb.CreateTaskRequest(task_id="only-a", backbone="minilm-l6",
                                            examples=text_examples(MINUTE_TOPICS)))
    ca.stub.CreateTask(pb.CreateTaskRequest(task_id="spam", backbone="minilm-l6",
                                            examples=text_examples(MINUTE_TOPICS)))
    swapped = {"sports": MINUTE_TOPICS["cooking"], "cooking": MINUTE_TOPICS["sports"]}
    cb.stub.CreateTask(pb.CreateTaskRequest(task_id="spam", backbone="minilm-l6", examples=text_examples(swapped)))
    for client, task_id in ((ca, "only-a"), (ca, "spam"), (cb, "spam")):
        assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    yield a, b, ca, cb
    ca.close()
    cb.close()


def not_found_like_a_missing_task(call_with_id) -> None:
    """`call_with_id(task_id)` fails for A's task exactly as for a task that exists nowhere."""
    outcomes = []
    for task_id in ("only-a", "nowhere-at-all"):
        with pytest.raises(grpc.RpcError) as err:
            call_with_id(task_id)
        outcomes.append((err.value.code(), err.value.details().replace(task_id, "ID")))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == grpc.StatusCode.NOT_FOUND, outcomes


def test_another_tenants_task_is_not_found_by_every_rpc_and_stays_unchanged(two_tenants):
    a, b, ca, cb = two_tenants
    before = ca.stub.GetTask(pb.GetTaskRequest(task_id="only-a"))
    s = cb.stub
    text = [pb.Input(text="Bake the bread.")]
    not_found_like_a_missing_task(lambda t: s.GetTask(pb.GetTaskRequest(task_id=t)))
    not_found_like_a_missing_task(lambda t: s.Predict(pb.PredictRequest(task_id=t, inputs=text)))
    not_found_like_a_missing_task(lambda t: list(s.PredictStream(iter([pb.PredictRequest(task_id=t, inputs=text)]))))
    not_found_like_a_missing_task(lambda t: s.AddExamples(iter([pb.AddExamplesRequest(
        task_id=t, examples=text_examples({"x": ["one"], "y": ["two"]}))])))
    not_found_like_a_missing_task(lambda t: s.TrainTask(pb.TrainTaskRequest(task_id=t)))
    not_found_like_a_missing_task(lambda t: list(s.WatchJob(pb.WatchJobRequest(task_id=t))))
    not_found_like_a_missing_task(lambda t: s.DeleteTask(pb.DeleteTaskRequest(task_id=t)))
    not_found_like_a_missing_task(lambda t: list(s.ExportTask(pb.ExportTaskRequest(task_id=t, version=1))))
    # A's job by its id: as unknown to B as a job id that never existed.
    outcomes = []
    for job_id in (before.job_id, "job-000000000000"):
        with pytest.raises(grpc.RpcError) as err:
            list(s.WatchJob(pb.WatchJobRequest(job_id=job_id)))
        outcomes.append((err.value.code(), err.value.details().replace(job_id, "ID")))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == grpc.StatusCode.NOT_FOUND
    after = ca.stub.GetTask(pb.GetTaskRequest(task_id="only-a"))
    assert (after.version, after.num_examples, after.updated_at_ms, after.state) == (
        before.version, before.num_examples, before.updated_at_ms, before.state)
    assert ca.stub.Predict(pb.PredictRequest(task_id="only-a", inputs=text)).predictions[0].label == "cooking"


def test_lists_and_multi_task_predicts_stay_within_the_tenant(two_tenants):
    a, b, ca, cb = two_tenants
    assert {t.task_id for t in cb.stub.ListTasks(pb.ListTasksRequest()).tasks} == {"spam"}
    assert {"only-a", "spam"} <= {t.task_id for t in ca.stub.ListTasks(pb.ListTasksRequest()).tasks}
    with pytest.raises(grpc.RpcError) as err:
        cb.stub.Predict(pb.PredictRequest(task_ids=["spam", "only-a"], inputs=[pb.Input(text="Bake a cake.")]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "only-a" in err.value.details()


def test_the_same_task_id_in_two_tenants_serves_two_heads(two_tenants):
    a, b, ca, cb = two_tenants
    request = pb.PredictRequest(task_id="spam", inputs=[pb.Input(text="Roast the chicken with garlic.")])
    assert ca.stub.Predict(request).predictions[0].label == "cooking"
    assert cb.stub.Predict(request).predictions[0].label == "sports"  # B swapped the labels


# --- keys: revocation and expiry --------------------------------------------------------------------------


def test_a_key_revoked_through_the_api_stops_at_once(server):
    who = make_tenant(server)
    admin = make_tenant(server, scopes=("admin",))
    client, ops = Client(server.address, who.api_key), Client(server.address, admin.api_key)
    try:
        client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)  # cached as valid now
        key_id = who.api_key.split("_")[1]
        assert ops.admin.RevokeKey(pb.RevokeKeyRequest(key_id=key_id)).revoked_at_ms > 0
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()
    finally:
        client.close()
        ops.close()


def test_tenants_and_keys_are_listed_a_page_at_a_time_each_once_in_order(server):
    """ListTenants (name order) and ListKeys (order made) page by keyset: every item once, a page never
    over page_size, an item made between two pages is not skipped, and bad paging is INVALID_ARGUMENT."""
    ops = Client(server.address, make_tenant(server, scopes=("admin",)).api_key)
    owner = make_tenant(server)
    try:
        made = [make_tenant(server, unique_id(f"page{i}")) for i in range(5)]
        every = server.admin.list_tenants(1000)[0]
        names, token, pages = [], "", 0
        while True:
            page = ops.admin.ListTenants(pb.ListTenantsRequest(page_size=2, page_token=token), timeout=10)
            assert 1 <= len(page.tenants) <= 2
            names += [t.name for t in page.tenants]
            token, pages = page.next_page_token, pages + 1
            if pages == 1:  # sorts after the first page: must come on a later one
                late = make_tenant(server, "zz-" + unique_id("late"))
            if not token:
                break
        late_name = server.admin.tenant(late.tenant_id).tenant.name
        assert late_name > names[1]
        assert names == [v.tenant.name for v in server.admin.list_tenants(1000)[0]]  # the store's order
        assert len(set(names)) == len(names) == len(every) + 1 and late_name in names
        assert {server.admin.tenant(m.tenant_id).tenant.name for m in made} <= set(names)

        tenant_id = owner.tenant_id
        keys = [server.admin.create_key(tenant_id, ["predict"], f"k{i}")[0] for i in range(5)]
        server.admin.revoke_key(keys[1].key_id)  # revoked keys are listed too
        ids, token = [], ""
        while True:
            page = ops.admin.ListKeys(pb.ListKeysRequest(tenant=tenant_id, page_size=2, page_token=token), timeout=10)
            assert len(page.keys) <= 2 and all(k.tenant_id == tenant_id for k in page.keys)
            ids += [k.key_id for k in page.keys]
            token = page.next_page_token
            if not token:
                break
        records = server.admin.list_keys(tenant_id, 1000)[0]
        in_order = [k.key_id for k in sorted(records, key=lambda k: (k.created_at_ms, k.key_id))]
        assert set(in_order) == {owner.api_key.split("_")[1], *[k.key_id for k in keys]}
        assert ids == in_order
        assert [k.key_id for k in ops_client_keys(ops, tenant_id)] == in_order

        for request, stub in ((pb.ListTenantsRequest(page_size=-1), ops.admin.ListTenants),
                              (pb.ListTenantsRequest(page_size=1001), ops.admin.ListTenants),
                              (pb.ListKeysRequest(page_size=5000), ops.admin.ListKeys),
                              (pb.ListKeysRequest(page_token="not a token"), ops.admin.ListKeys),
                              (pb.ListKeysRequest(page_token="12:"), ops.admin.ListKeys),
                              (pb.ListKeysRequest(page_token=f"{2 ** 64}:k"), ops.admin.ListKeys)):
            with pytest.raises(grpc.RpcError) as err:
                stub(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "page_" in err.value.details()
        # The largest token it accepts is past every key (not an overflow in the store)
        assert not ops.admin.ListKeys(pb.ListKeysRequest(page_token="9" * 18 + ":k"), timeout=10).keys
    finally:
        ops.close()


def ops_client_keys(ops: Client, tenant_id: str) -> list[pb.ApiKey]:
    from service.client import HeadServeClient

    with HeadServeClient(ops.address, api_key=None, channel=ops.channel) as client:
        return client.list_keys(tenant_id, page_size=1)


def test_a_key_revoked_elsewhere_stops_within_the_cache_time(server):
    """A revocation made through another replica (or the local CLI) on the same store: this server
    notices within auth_cache_seconds."""
    who = make_tenant(server)
    client = Client(server.address, who.api_key)
    try:
        client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        TenantAdmin(server.app.store).revoke_key(who.api_key.split("_")[1])  # no word to this server
        revoked = time.monotonic()
        while True:
            try:
                client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - revoked < server.app.settings.auth_cache_seconds + 3.0
            time.sleep(0.05)
    finally:
        client.close()


def test_an_expired_key_stops_working(server):
    who = make_tenant(server)
    record, key = server.admin.create_key(who.tenant_id, ["predict"], expires_at_ms=int(time.time() * 1000) + 1500)
    client = Client(server.address, key)
    try:
        client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        time.sleep(max(0.0, record.expires_at_ms / 1000 - time.time()) + 0.05)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ListTasks(pb.ListTasksRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.value.details()
    finally:
        client.close()


# --- quotas and rates --------------------------------------------------------------------------------------


def test_quotas_answer_resource_exhausted_change_nothing_and_recover(server):
    who = make_tenant(server)
    admin = make_tenant(server, scopes=("admin",))
    client, ops = Client(server.address, who.api_key), Client(server.address, admin.api_key)
    try:
        ops.admin.SetQuotas(pb.SetQuotasRequest(tenant=who.tenant_id, quotas=pb.Quotas(tasks=1, examples=9)))
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="first", backbone="minilm-l6",
                                                    examples=text_examples(MINUTE_TOPICS)))
        with pytest.raises(grpc.RpcError) as err:
            client.stub.CreateTask(pb.CreateTaskRequest(task_id="second", backbone="minilm-l6"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tasks quota" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.stub.AddExamples(iter([pb.AddExamplesRequest(
                task_id="first", examples=text_examples({"sports": ["One more goal."]}))]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "examples quota" in err.value.details()
        assert client.stub.GetTask(pb.GetTaskRequest(task_id="first")).num_examples == 9
        tenant = ops.admin.GetTenant(pb.GetTenantRequest(tenant=who.tenant_id))
        assert (tenant.usage.tasks, tenant.usage.examples) == (1, 9)
        ops.admin.SetQuotas(pb.SetQuotasRequest(tenant=who.tenant_id, quotas=pb.Quotas()))  # unlimited again
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="second", backbone="minilm-l6"))
    finally:
        client.close()
        ops.close()


def test_predict_rates_answer_resource_exhausted_with_a_retry_time_and_recover(server, two_tenants):
    a, b, ca, cb = two_tenants
    server.admin.set_quotas(b.tenant_id, server.admin.tenant(b.tenant_id).tenant.quotas.__class__(
        predict_requests_per_second=0.5))  # a burst of one request, then one every 2 s
    request = pb.PredictRequest(task_id="spam", inputs=[pb.Input(text="A goal in the last minute.")])
    try:
        refused = None
        for _ in range(3):
            try:
                cb.stub.Predict(request, timeout=10)
            except grpc.RpcError as err:
                refused = err
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predict_requests_per_second quota (0.5/s); retry in" in refused.details()
        ca.stub.Predict(pb.PredictRequest(task_id="spam", inputs=request.inputs), timeout=10)  # A is not limited
        time.sleep(float(refused.details().rsplit("retry in ", 1)[1].split()[0]) + 0.1)
        cb.stub.Predict(request, timeout=10)  # the token came back when the message said
    finally:
        server.admin.set_quotas(b.tenant_id, server.admin.tenant(b.tenant_id).tenant.quotas.__class__())


# --- the pipeline's other duties -------------------------------------------------------------------------


def test_audit_lines_name_tenant_key_method_and_outcome_and_never_the_secret(server, caplog):
    who = make_tenant(server)
    client = Client(server.address, who.api_key)
    caplog.set_level(logging.INFO, logger="headserve.audit")
    try:
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="audited", backbone="minilm-l6"))
        with pytest.raises(grpc.RpcError):
            client.admin.ListTenants(pb.ListTenantsRequest())
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "headserve.audit"]
    key_id = who.api_key.split("_")[1]
    assert any(f"method=CreateTask tenant={who.tenant_id} key={key_id} task='audited' outcome=OK" in line
               for line in lines), lines
    assert any(f"method=ListTenants tenant={who.tenant_id} key={key_id}" in line and "PERMISSION_DENIED" in line
               for line in lines), lines
    secret = who.api_key.split("_", 2)[2]
    assert not any(secret in r.getMessage() for r in caplog.records)


def test_a_request_that_is_not_its_protobuf_message_is_invalid_argument(server, client):
    rpc = client.channel.unary_unary("/headserve.v1.HeadServe/Predict", request_serializer=lambda m: m,
                                     response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        rpc(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)  # a length-delimited field longer than the message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid Predict" in err.value.details()
    stream = client.channel.stream_unary("/headserve.v1.HeadServe/AddExamples", request_serializer=lambda m: m,
                                         response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        stream(iter([b"\x12\x03\x0a\x01"]), timeout=10)  # a truncated nested message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_status_messages_quote_huge_inputs_cut_short(client):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetTask(pb.GetTaskRequest(task_id="x" * 10_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) <= 1000


def test_an_upload_the_client_abandons_is_not_stored(server, client):
    """AddExamples is all or nothing, also when the client gives up after its stream ended normally but
    before the server committed: the store's write lock is held to keep the server at that point while
    the client cancels; the server must then roll back."""
    task_id = unique_id("upload")
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))
    upload = [pb.AddExamplesRequest(task_id=task_id, examples=text_examples(MINUTE_TOPICS))]
    store = server.app.store
    writing = threading.Event()
    add_examples = store.add_examples

    def entered(*args, **kwargs):  # the server has read and checked the whole stream
        writing.set()
        return add_examples(*args, **kwargs)

    store.add_examples = entered
    try:
        for abandon in ("cancel", "deadline"):
            writing.clear()
            with store._write:  # ... and now waits here to write
                if abandon == "cancel":
                    future = client.stub.AddExamples.future(iter(upload))
                    assert writing.wait(30), "the server never came to store the upload"
                    future.cancel()
                else:
                    future = client.stub.AddExamples.future(iter(upload), timeout=2.0)
                    assert writing.wait(30), "the server never came to store the upload"
                    time.sleep(2.2)
                with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                    future.result(timeout=10)
                time.sleep(0.2)  # the server learns the call ended
            time.sleep(0.3)  # the server takes the lock now and must not commit
            assert client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).num_examples == 0, abandon
    finally:
        del store.add_examples
    assert client.stub.AddExamples(iter(upload)).added == 9  # a client that waits gets its examples stored


# --- start-up and the CLI ---------------------------------------------------------------------------------


def test_no_auth_on_a_public_address_is_refused_unless_allowed(tmp_path, caplog):
    with pytest.raises(ValueError, match="not a loopback address"):
        check_exposure(Settings(address="0.0.0.0:0", data_dir=tmp_path))
    caplog.set_level(logging.WARNING, logger="service.server")
    check_exposure(Settings(address="0.0.0.0:0", data_dir=tmp_path, allow_insecure=True))
    assert "allow_insecure" in caplog.text
    check_exposure(Settings(address="0.0.0.0:0", data_dir=tmp_path, auth="api_key"))
    for loopback in ("127.0.0.1:0", "localhost:50051", "[::1]:0"):
        check_exposure(Settings(address=loopback, data_dir=tmp_path))


def test_serve_refuses_a_public_address_without_auth_in_one_line(tmp_path, capsys):
    assert main(["serve", "--address", "0.0.0.0:0", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "Traceback" not in err


def test_tenants_and_keys_through_the_cli_locally_and_over_the_api(server, capsys):
    data_dir = str(server.app.settings.data_dir)
    # Bootstrap on the store itself (the running server shares it).
    assert main(["tenants", "create", unique_id("ops"), "--scopes", "admin", "--data-dir", data_dir, "--json"]) == 0
    ops = json.loads(capsys.readouterr().out)
    assert ops["tenant"].startswith("tn-") and ops["api_key"].startswith("hsk_") and ops["scopes"] == ["admin"]
    remote = ["--address", server.address, "--api-key", ops["api_key"]]
    name = unique_id("team")
    assert main([*remote, "tenants", "create", name, "--json"]) == 0
    team = json.loads(capsys.readouterr().out)
    assert main(["tenants", "quota", name, "--tasks", "5", "--address", server.address, "--api-key",
                 ops["api_key"], "--json"]) == 0  # connection flags after the command work too
    assert json.loads(capsys.readouterr().out)["quotas"]["tasks"] == 5
    assert main([*remote, "keys", "create", name, "--scopes", "predict", "--expires", "30d", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["scopes"] == ["predict"] and second["expires_at_ms"] > time.time() * 1000
    assert main(["keys", "list", name, "--data-dir", data_dir, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {k["key_id"] for k in listed} == {team["key_id"], second["key_id"]}
    assert "api_key" not in json.dumps(listed) and second["api_key"] not in json.dumps(listed)
    assert main([*remote, "keys", "revoke", second["key_id"]]) == 0
    assert "revoked API key" in capsys.readouterr().out
    team_client = Client(server.address, team["api_key"])
    try:
        team_client.stub.CreateTask(pb.CreateTaskRequest(task_id="t", backbone="minilm-l6"))
    finally:
        team_client.close()
    assert main([*remote, "tenants", "list", "--json"]) == 0
    usage = {t["name"]: t["usage"] for t in json.loads(capsys.readouterr().out)}
    assert usage[name]["tasks"] == 1
    assert main([*remote, "tenants", "delete", name]) == 0
    assert "1 task(s)" in capsys.readouterr().out
    assert main(["--address", server.address, "--api-key", team["api_key"], "tasks"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # A team key cannot administer.
    assert main(["--address", server.address, "--api-key", second["api_key"], "tenants", "list"]) == 1
    assert main(["tenants", "create", "bad name!", "--data-dir", data_dir]) == 1
    assert "not valid" in capsys.readouterr().err


class CountingStore:
    """A real SQLite store whose key and tenant reads are counted and slowed (so that callers overlap), and
    fail as a database that stopped answering does while `down`."""

    def __init__(self, store, delay: float = 0.05) -> None:
        self._store = store
        self.delay = delay
        self.down = False
        self.reads = {"get_key": 0, "get_tenant": 0}
        self._lock = threading.Lock()

    def _read(self, name, *args):
        with self._lock:
            self.reads[name] += 1
        if self.down:
            import sqlalchemy as sa

            raise sa.exc.OperationalError("SELECT ...", {}, ConnectionRefusedError("connection refused"))
        answer = getattr(self._store, name)(*args)
        time.sleep(self.delay)  # read, then slow to answer: an answer can be older than a change made meanwhile
        return answer

    def get_key(self, key_id):
        return self._read("get_key", key_id)

    def get_tenant(self, ref):
        return self._read("get_tenant", ref)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_concurrent_calls_whose_cached_key_expired_read_the_store_once_and_a_revocation_is_not_undone(tmp_path):
    from service.store import Store
    from service.tenants import Authenticator

    store = Store.open(tmp_path)
    try:
        counting = CountingStore(store)
        auth = Authenticator(counting, cache_seconds=0.5)
        admin = TenantAdmin(store, auth)
        tenant, record, key = admin.create_tenant("flights")
        callers = []

        def burst(n: int = 16) -> list:
            barrier = threading.Barrier(n)

            def one():
                barrier.wait()
                try:
                    return auth.authenticate(key).tenant_id
                except Exception as exc:  # noqa: BLE001 (the outcome is what the test compares)
                    return type(exc).__name__

            threads = [threading.Thread(target=lambda: callers.append(one())) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            return callers[-n:]

        assert burst() == [tenant.tenant_id] * 16
        assert counting.reads == {"get_key": 1, "get_tenant": 1}  # 16 callers, one read each
        time.sleep(0.6)  # the entry expires: the next burst reads once more
        assert burst() == [tenant.tenant_id] * 16
        assert counting.reads == {"get_key": 2, "get_tenant": 2}
        # A revocation made here while a read is in flight: that read's answer is not cached, and the next
        # caller reads again and is refused.
        time.sleep(0.6)
        counting.delay = 0.3
        early = threading.Thread(target=lambda: callers.append(auth.authenticate(key).tenant_id))
        early.start()
        time.sleep(0.1)  # its read has the key before the revocation, and has not answered yet
        admin.revoke_key(record.key_id)
        counting.delay = 0.0
        with pytest.raises(Exception, match="revoked"):
            auth.authenticate(key)  # does not take the early read's answer
        early.join(10)
        assert callers[-1] == tenant.tenant_id  # the early caller, which came before the revocation
        with pytest.raises(Exception, match="revoked"):
            auth.authenticate(key)
        # A failed read fails the callers that waited for it, and the next call reads again.
        time.sleep(0.6)
        store.close()
        with pytest.raises(Exception):  # noqa: B017 (the store's own error, whichever it is)
            auth.authenticate(key)
        assert not auth._flights
    finally:
        store.close()


def test_keys_verified_recently_are_accepted_while_the_store_does_not_answer_and_others_are_unavailable(tmp_path):
    import sqlalchemy as sa

    from service.store import Store
    from service.tenants import Authenticator

    store = Store.open(tmp_path)
    try:
        flaky = CountingStore(store, delay=0.0)
        auth = Authenticator(flaky, cache_seconds=0.2, stale_seconds=1.5)
        admin = TenantAdmin(store, auth)
        tenant, _, known = admin.create_tenant("outage")
        _, stranger = admin.create_key(tenant.tenant_id, ["predict"])
        assert auth.authenticate(known).tenant_id == tenant.tenant_id
        flaky.down = True
        time.sleep(0.3)  # past the cache: the store is asked, does not answer, and the key is accepted
        reads = sum(flaky.reads.values())
        assert auth.authenticate(known).tenant_id == tenant.tenant_id
        assert sum(flaky.reads.values()) == reads + 1
        assert auth.authenticate(known).tenant_id == tenant.tenant_id  # and not asked again at once
        assert sum(flaky.reads.values()) == reads + 1
        with pytest.raises(sa.exc.OperationalError):  # never verified: UNAVAILABLE at the edge
            auth.authenticate(stranger)
        time.sleep(1.6)  # past auth_stale_seconds since the key was last verified
        with pytest.raises(sa.exc.OperationalError):
            auth.authenticate(known)
        flaky.down = False
        assert auth.authenticate(known).tenant_id == tenant.tenant_id
        assert auth.authenticate(stranger).tenant_id == tenant.tenant_id
        # With auth_stale_seconds = 0, an expired entry is not served through an outage.
        strict = Authenticator(flaky, cache_seconds=0.2, stale_seconds=0)
        assert strict.authenticate(known).tenant_id == tenant.tenant_id
        flaky.down = True
        time.sleep(0.3)
        with pytest.raises(sa.exc.OperationalError):
            strict.authenticate(known)
    finally:
        store.close()


def test_a_key_revoked_by_a_replica_whose_clock_runs_ahead_is_refused_everywhere_at_once(tmp_path, monkeypatch):
    import service.store as store_module
    from adapters.errors import Unauthenticated
    from service.store import Store
    from service.tenants import Authenticator

    store = Store.open(tmp_path)
    try:
        _, record, key = TenantAdmin(store, Authenticator(store)).create_tenant("skewed")
        real = store_module.now_ms
        monkeypatch.setattr(store_module, "now_ms", lambda: real() + 120_000)  # the revoking replica's clock
        store.revoke_key(record.key_id)
        monkeypatch.setattr(store_module, "now_ms", real)
        with pytest.raises(Unauthenticated, match="revoked"):
            Authenticator(store).authenticate(key)  # another replica, its clock right
    finally:
        store.close()
