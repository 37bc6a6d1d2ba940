"""The `headserve` CLI: input-file parsing and usage errors offline, every command against the real server."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import subprocess
import sys
import uuid

import grpc
import onnxruntime as ort
import pytest
from PIL import Image

from service.cli import UsageError, main, read_image_examples, read_text_examples, read_text_inputs
from service.client import HeadServeClient, open_channel
from service.gen import headserve_pb2 as pb

REPO = pathlib.Path(__file__).resolve().parent.parent

TOPICS = {
    "sports": [
        "The midfielder scored a late winner in the derby.",
        "The sprinter won gold in the hundred metres final.",
        "Our volleyball team lost the match in five sets.",
        "The referee showed a red card to the defender.",
        "She climbed to the top of the leaderboard after the final round of golf.",
        "The boxer knocked out his opponent in the third round.",
        "Fans cheered as the hockey team lifted the trophy.",
        "The batsman hit a six to win the cricket game.",
    ],
    "cooking": [
        "Knead the dough for ten minutes and let it rise.",
        "Grill the salmon with lemon and dill.",
        "Melt the chocolate over a pan of simmering water.",
        "Dice the carrots and add them to the stew.",
        "Fry the garlic in olive oil until golden.",
        "Fold the cream into the batter before baking the cake.",
        "Sprinkle grated cheese over the lasagne.",
        "Reduce the wine sauce over a low heat.",
    ],
    "computing": [
        "The script throws an exception when the file is missing.",
        "Upgrade the operating system and reboot the machine.",
        "The web server returns a 500 error for every request.",
        "Write a unit test for the parser function.",
        "The CPU usage spikes when the backup job runs.",
        "Merge the feature branch after the code review.",
        "The API returns JSON with the user's settings.",
        "Debug the memory leak in the C++ application.",
    ],
}
ROWS = [(text, label) for label, texts in TOPICS.items() for text in texts]
PROBES = {
    "sports": "The striker scored a goal in the football match.",
    "cooking": "Bake the cookies in the oven with butter and sugar.",
    "computing": "The program crashed because of a bug in the code.",
}


@pytest.fixture(scope="module", autouse=True)
def _api_key(tenant):
    """The suite's server wants API keys: clients and the CLI read this tenant's from the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSERVE_API_KEY", tenant.api_key)
        yield


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps tables to the terminal width; a wide one keeps ids and sentences on one line."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("HEADSERVE_ADDRESS", raising=False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def write_csv(path: pathlib.Path, rows, header=("text", "label")) -> pathlib.Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for text, label in rows:
            writer.writerow((text, label) if header == ("text", "label") else (label, text))
    return path


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def write_png(path: pathlib.Path, rgb: tuple[int, int, int]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), rgb).save(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- input files -------------------------------------------------------------------------------------


def test_csv_examples_in_either_column_order(tmp_path):
    rows = [("a goal, at last", "sports"), ('He said "salt"', "cooking")]
    assert read_text_examples(write_csv(tmp_path / "a.csv", rows)) == rows
    assert read_text_examples(write_csv(tmp_path / "b.csv", rows, header=("label", "text"))) == rows


def test_csv_header_is_case_insensitive_and_extra_columns_are_ignored(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("\ufeffID, Label ,Text\n1,sports,  a goal \n2,cooking,add salt\n", encoding="utf-8")
    assert read_text_examples(path) == [("a goal", "sports"), ("add salt", "cooking")]


def test_jsonl_examples(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text('{"text": "a goal", "label": "sports"}\n\n{"label": "cooking", "text": "add salt"}\n')
    assert read_text_examples(path) == [("a goal", "sports"), ("add salt", "cooking")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "bad.csv",
            "sentence,label\nhi,a\n",
            "header must name the columns text, label; found sentence, label",
        ),
        ("bad.csv", "text,label\nhi,a\nthere,\n", r"bad.csv:3: needs a non-empty label"),
        ("bad.csv", "text,label\n", "has no records"),
        ("bad.jsonl", '{"text": "hi", "label": "a"}\n{"text": "hi"\n', r"bad.jsonl:2: not JSON"),
        ("bad.jsonl", '{"text": "hi", "label": 3}\n', r"bad.jsonl:1: needs a non-empty label"),
        ("bad.jsonl", '["hi", "a"]\n', r"bad.jsonl:1: needs a non-empty text and label"),
    ],
)
def test_bad_example_files_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_text_examples(path)


def test_missing_example_file(tmp_path):
    with pytest.raises(UsageError, match="is not a file"):
        read_text_examples(tmp_path / "nope.csv")


def test_text_inputs_from_lines_csv_and_jsonl(tmp_path):
    lines = tmp_path / "inputs.txt"
    lines.write_text("first sentence\n\n  second sentence  \n")
    assert read_text_inputs(lines) == ["first sentence", "second sentence"]
    assert read_text_inputs(write_csv(tmp_path / "in.csv", [("one", "a"), ("two", "b")])) == ["one", "two"]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two", "id": 7}\n')
    assert read_text_inputs(jsonl) == ["one", "two"]


def test_image_folder_gives_one_label_per_subfolder(tmp_path):
    red = write_png(tmp_path / "red" / "a.png", (255, 0, 0))
    nested = write_png(tmp_path / "red" / "more" / "b.JPG", (250, 0, 0))
    blue = write_png(tmp_path / "blue" / "c.webp", (0, 0, 255))
    write_png(tmp_path / "blue" / ".hidden.png", (0, 0, 255))
    write_png(tmp_path / ".cache" / "d.png", (0, 0, 0))
    write_png(tmp_path / "loose.png", (0, 0, 0))
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    assert read_image_examples(tmp_path) == [(blue, "blue"), (red, "red"), (nested, "red")]


def test_image_folder_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "empty-label").mkdir()
    with pytest.raises(UsageError, match="no images"):
        read_image_examples(tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        read_image_examples(tmp_path / "nope")


# --- usage, entry points and serve --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["predict", "t"], "one of the arguments --text --image --file is required"),
        (["predict", "t", "--text", "a", "--file", "f"], "not allowed with"),
        (["create", "t", "--text", "f.csv"], "--backbone"),
        (["train", "t", "--strategy", "svm"], "invalid choice"),
        (["train", "t", "--label-text", "maybe"], "invalid choice"),
        (["train", "t", "--describe", "sports"], "expected LABEL=WORDS, got 'sports'"),
        (["add", "t", "--text", "f.csv", "--batch-size", "0"], "must be at least 1"),
        (["watch"], "watch needs either TASK_ID or --job JOB_ID"),
        (["watch", "t", "--job", "j"], "watch needs either TASK_ID or --job JOB_ID"),
        (
            ["create", "t", "--backbone", "minilm-l6", "--text", "/no/such.csv"],
            "error: /no/such.csv is not a file",
        ),
        (["predict", "t", "--image", "/no/such.png"], "error: no such image file: /no/such.png"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


def test_predict_from_an_empty_file_exits_2(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    status, _, err = run(capsys, "predict", "t", "--file", str(empty))
    assert (status, err) == (2, f"error: {empty} has no texts\n")


def test_help_exits_0(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "serve" in out and "predict" in out


def test_python_dash_m_service_help():
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "backbones", "create", "add", "train", "watch", "predict", "export", "tasks"):
        assert command in result.stdout


def test_client_commands_do_not_import_torch():
    code = "import sys, service.cli; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_serve_flags_beat_the_config_file_and_unset_flags_do_not(capsys, monkeypatch, tmp_path):
    from service import server

    started = []
    monkeypatch.setattr(server, "run", started.append)
    monkeypatch.delenv("HEADSERVE_LOG_LEVEL", raising=False)
    config = tmp_path / "headserve.toml"
    config.write_text('address = "127.0.0.1:7000"\nlog_level = "DEBUG"\ndata_dir = "/from/file"\n')

    status, _, _ = run(capsys, "serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert status == 0
    (settings,) = started
    assert settings.address == "127.0.0.1:7000"  # from the file: --address not given
    assert settings.log_level == "DEBUG"
    assert settings.data_dir == tmp_path / "data"  # the flag wins

    status, _, _ = run(
        capsys, "serve", "--config", str(config), "--address", "127.0.0.1:0", "--log-level", "error"
    )
    assert status == 0
    assert (started[1].address, started[1].log_level) == ("127.0.0.1:0", "ERROR")


def test_serve_with_a_bad_config_exits_2(capsys, monkeypatch, tmp_path):
    from service import server

    monkeypatch.setattr(server, "run", lambda settings: pytest.fail("server started"))
    status, _, err = run(capsys, "serve", "--config", str(tmp_path / "missing.toml"))
    assert (status, err.startswith("error: bad settings:")) == (2, True)
    status, _, err = run(capsys, "serve", "--address", "localhost")
    assert status == 2 and "HOST:PORT" in err


# --- against the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """A text task created and trained through the CLI, for the tests that only read it."""
    task_id = new_id("cli-text")
    data = write_csv(tmp_path_factory.mktemp("cli") / "examples.csv", ROWS)
    assert (
        main(["--address", server.address, "create", task_id, "--backbone", "minilm-l6", "--text", str(data)])
        == 0
    )
    yield task_id
    with HeadServeClient(server.address) as client:
        client.delete_task(task_id)


@pytest.fixture
def cli(server, capsys):
    """Runs the CLI against the test server; returns (exit status, stdout, stderr)."""
    return lambda *argv: run(capsys, "--address", server.address, *argv)


def get_task(server, task_id: str) -> pb.Task:
    with HeadServeClient(server.address) as client:
        return client.get_task(task_id)


def test_backbones_table(cli):
    status, out, _ = cli("backbones")
    assert status == 0
    lines = {line.split()[1]: line for line in out.splitlines() if "minilm-l6" in line or "mobilenet" in line}
    assert "text" in lines["minilm-l6"] and "384" in lines["minilm-l6"] and "cpu" in lines["minilm-l6"]
    assert "image" in lines["mobilenet_v3_small"]


def test_address_comes_from_the_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("HEADSERVE_ADDRESS", server.address)
    status, out, _ = run(capsys, "backbones")
    assert status == 0 and "minilm-l6" in out


def test_create_from_csv_waits_and_prints_the_evaluation(server, cli, tmp_path):
    task_id = new_id("cli-create")
    data = write_csv(tmp_path / "examples.csv", ROWS, header=("label", "text"))
    status, out, err = cli(
        "create", task_id, "--backbone", "minilm-l6", "--text", str(data), "--strategy", "linear"
    )
    assert status == 0, err
    assert f"created task {task_id} on minilm-l6 with {len(ROWS)} examples" in out
    assert "succeeded" in out and "version 1" in out
    assert "train accuracy" in out and "100.0%" in out and "validation accuracy" in out
    for label in TOPICS:
        assert [label, "8"] in [[cell.strip() for cell in line.split("│")[1:3]] for line in out.splitlines()]
    assert "done" in err and "100%" in err  # the progress bar, finished
    task = get_task(server, task_id)
    assert (task.state, task.num_examples, task.config.strategy) == (pb.Task.READY, len(ROWS), pb.LINEAR)


def test_create_streams_examples_beyond_one_batch(server, cli, tmp_path):
    task_id = new_id("cli-stream")
    data = write_jsonl(tmp_path / "examples.jsonl", ROWS)
    status, out, err = cli(
        "create",
        task_id,
        "--backbone",
        "minilm-l6",
        "--text",
        str(data),
        "--batch-size",
        "5",
        *[arg for label in TOPICS for arg in ("--label", label)],
    )
    assert status == 0, err
    task = get_task(server, task_id)
    # Created with its labels first, the task was zero-shot (version 1) until the streamed examples trained
    # version 2.
    assert (task.state, task.version, task.num_examples) == (pb.Task.READY, 2, len(ROWS))
    assert dict(task.examples_per_label) == {label: 8 for label in TOPICS}


def test_no_wait_then_watch_by_task_and_by_job(server, cli, tmp_path):
    task_id = new_id("cli-watch")
    data = write_csv(tmp_path / "examples.csv", ROWS)
    status, out, _ = cli("create", task_id, "--backbone", "minilm-l6", "--text", str(data), "--no-wait")
    assert status == 0
    job_id = out.split("headserve watch --job ")[1].split()[0]
    status, out, _ = cli("watch", task_id)
    assert status == 0 and f"job {job_id} succeeded" in out
    status, out, _ = cli("watch", "--job", job_id)
    assert status == 0 and f"job {job_id} succeeded" in out and "train accuracy" in out


def test_add_then_train_makes_a_new_version(server, cli, tmp_path):
    task_id = new_id("cli-add")
    first_rows = [(text, "sports") for text in TOPICS["sports"][:2]]
    first_rows += [(text, "cooking") for text in TOPICS["cooking"][:2]]
    first = write_csv(tmp_path / "first.csv", first_rows)
    status, _, err = cli("create", task_id, "--backbone", "minilm-l6", "--text", str(first))
    assert status == 0, err

    status, out, _ = cli(
        "add", task_id, "--text", str(write_csv(tmp_path / "all.csv", ROWS)), "--batch-size", "7"
    )
    assert status == 0
    assert f"added {len(ROWS) - 4} examples to task {task_id} (4 duplicates ignored)" in out
    assert f"the task has {len(ROWS)} examples: computing 8, cooking 8, sports 8" in out

    status, out, err = cli("train", task_id, "--strategy", "prototype")
    assert status == 0, err
    assert "now serves version 2" in out and "prototype" in out
    task = get_task(server, task_id)
    assert (task.version, task.evaluation.strategy, task.evaluation.num_examples) == (
        2,
        "prototype",
        len(ROWS),
    )


def test_predict_json_names_the_topic(cli, trained):
    status, out, _ = cli("predict", trained, "--text", *PROBES.values(), "--json")
    assert status == 0
    document = json.loads(out)
    assert document["task_id"] == trained and document["version"] == 1
    assert [p["input"] for p in document["predictions"]] == list(PROBES.values())
    assert [p["label"] for p in document["predictions"]] == list(PROBES)
    for prediction in document["predictions"]:
        assert len(prediction["top"]) == 3
        assert prediction["top"][0] == {"label": prediction["label"], "score": prediction["score"]}

    status, out, _ = cli(
        "predict", trained, "--text", PROBES["cooking"], "--text", PROBES["sports"], "--top-k", "1", "--json"
    )
    assert [[t["label"] for t in p["top"]] for p in json.loads(out)["predictions"]] == [
        ["cooking"],
        ["sports"],
    ]


def test_predict_table_from_a_file(cli, trained, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(list(PROBES.values()) * 30))  # 90 lines: more than one Predict batch
    status, out, _ = cli("predict", trained, "--file", str(inputs), "--top-k", "2")
    assert status == 0
    rows = [line for line in out.splitlines() if any(probe[:30] in line for probe in PROBES.values())]
    assert len(rows) == 90
    for label, probe in PROBES.items():
        assert all(line.split("│")[2].strip() == label for line in rows if probe[:30] in line)
    assert f"task {trained}, version 1" in out


def test_get_and_tasks_show_the_task(cli, trained):
    status, out, _ = cli("get", trained)
    assert status == 0
    assert "READY" in out and "evaluation of version 1" in out and "train accuracy" in out
    assert f"{len(ROWS)} (computing 8, cooking 8, sports 8)" in out
    assert re.search(r"label words\s+worth \d+ examples each", out), out

    status, out, _ = cli("tasks")
    assert status == 0
    (line,) = [line for line in out.splitlines() if trained in line]
    assert "minilm-l6" in line and "READY" in line
    status, out, _ = cli("tasks", "--backbone", "mobilenet_v3_small")
    assert status == 0 and trained not in out


def test_export_writes_a_head_onnxruntime_loads(cli, trained, tmp_path):
    path = tmp_path / "head.onnx"
    status, out, err = cli("export", trained, "-o", str(path))
    assert status == 0, err
    assert f"wrote {path} ({path.stat().st_size} bytes, head ONNX, version 1)" in out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[-1] == 3

    status, _, err = cli("export", trained, "-o", str(tmp_path / "v9.onnx"), "--version", "9")
    assert status == 1 and err.startswith("error: NOT_FOUND: ")
    assert not (tmp_path / "v9.onnx").exists()


def test_image_task_from_a_folder(server, cli, tmp_path):
    for i in range(6):
        write_png(tmp_path / "images" / "red" / f"{i}.png", (255 - 10 * i, 8 * i, 0))
        write_png(tmp_path / "images" / "blue" / f"{i}.png", (0, 8 * i, 255 - 10 * i))
    task_id = new_id("cli-image")
    status, out, err = cli(
        "create", task_id, "--backbone", "mobilenet_v3_small", "--images", str(tmp_path / "images")
    )
    assert status == 0, err
    probes = [
        write_png(tmp_path / "probe-red.png", (235, 20, 10)),
        write_png(tmp_path / "probe-blue.png", (10, 20, 235)),
    ]
    status, out, _ = cli("predict", task_id, "--image", *map(str, probes), "--json")
    assert status == 0
    assert [p["label"] for p in json.loads(out)["predictions"]] == ["red", "blue"]

    fused = tmp_path / "fused.onnx"
    status, out, _ = cli("export", task_id, "-o", str(fused), "--format", "fused")
    assert status == 0 and "fused ONNX" in out
    ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])

    status, out, err = cli("delete", task_id)
    assert status == 0 and f"deleted task {task_id}" in out


def test_server_errors_are_one_line_with_the_status_code(cli, trained, tmp_path):
    missing = new_id("cli-missing")
    for argv in (
        ("get", missing),
        ("delete", missing),
        ("predict", missing, "--text", "hi"),
        ("watch", missing),
    ):
        status, out, err = cli(*argv)
        assert (status, out) == (1, "")
        assert err.startswith("error: NOT_FOUND: ") and err.count("\n") == 1, err

    data = write_csv(tmp_path / "examples.csv", ROWS)
    status, _, err = cli("create", trained, "--backbone", "minilm-l6", "--text", str(data))
    assert status == 1 and err.startswith("error: ALREADY_EXISTS: ")
    status, _, err = cli("create", new_id("cli-bad"), "--backbone", "no-such-backbone", "--text", str(data))
    assert status == 1 and err.startswith("error: NOT_FOUND: ")
    status, _, err = cli("predict", trained, "--image", str(write_png(tmp_path / "x.png", (1, 2, 3))))
    assert status == 1 and err.startswith("error: INVALID_ARGUMENT: ")


def test_unreachable_server_says_which_address_was_tried(capsys):
    status, _, err = run(capsys, "--address", "127.0.0.1:1", "tasks")
    assert status == 1 and err.startswith("error: no headserve server answers at 127.0.0.1:1 ")


def test_delete_then_get_is_not_found(server, cli):
    task_id = new_id("cli-delete")
    with HeadServeClient(server.address) as client:
        client.create_task("minilm-l6", task_id=task_id)
    status, out, _ = cli("delete", task_id)
    assert status == 0 and out.strip() == f"deleted task {task_id}"
    status, _, err = cli("get", task_id)
    assert status == 1 and err.startswith("error: NOT_FOUND: ") and "Traceback" not in err


def test_training_flags_reach_the_job(server, tenant, tmp_path, capsys):
    """--strategy/--tap/--reject-threshold/--label-text/--describe become the task's TrainingConfig, and
    rejected predictions are shown as such."""
    from service.cli import main

    csv = tmp_path / "topics.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{label}\n" for label, texts in TOPICS.items() for t in texts))
    task_id = f"flags-{uuid.uuid4().hex[:8]}"
    code = main(["--address", server.address, "create", task_id, "--backbone", "minilm-l6", "--text", str(csv),
                 "--strategy", "linear", "--tap", "last-1", "--reject-threshold", "0.99",
                 "--label-text", "on", "--describe", "sports=games and athletes",
                 "--describe", "cooking=recipes"])
    assert code == 0
    capsys.readouterr()
    assert main(["--address", server.address, "get", task_id]) == 0
    assert "last-1" in capsys.readouterr().out
    with open_channel(server.address, api_key=tenant.api_key) as channel:
        from service.gen import headserve_pb2_grpc as pb_grpc

        task = pb_grpc.HeadServeStub(channel).GetTask(pb.GetTaskRequest(task_id=task_id))
    assert task.config.strategy == pb.LINEAR and task.config.tap == "last-1"
    assert task.config.reject_threshold == pytest.approx(0.99) and task.evaluation.tap == "last-1"
    assert task.config.label_text == pb.LABEL_TEXT_ON
    assert dict(task.config.label_descriptions) == {"sports": "games and athletes", "cooking": "recipes"}
    words = json.loads(task.evaluation.details_json)["label_text"]
    assert words["weight"] == 16 and words["described"] == 2
    assert main(["--address", server.address, "predict", task_id, "--text", "zzzz qqqq", "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
    assert prediction["rejected"] == (prediction["score"] < 0.99)
    assert prediction["label"] == ("" if prediction["rejected"] else prediction["top"][0]["label"])
