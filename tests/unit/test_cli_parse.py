"""The command line's parsing: flags, TASKRUN_* fallbacks, local validation and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import pytest

from taskrun.cli import credentials as creds
from taskrun.cli import main as cli
from taskrun.cli import server_cmd, task_cmd, worker_cmd
from taskrun.cli.client import Client
from taskrun.cli.dev import ready_message, resolve_listen
from taskrun.cli.exits import CliError, describe_rpc_error, exit_code_for_status, exit_code_for_task
from taskrun.core.errors import InvalidArgument
from taskrun.core.status import TaskStatus, WorkerStatus
from taskrun.ports import split_host_port

TASKRUN_VARS = (
    "TASKRUN_SERVER",
    "TASKRUN_CERTS_DIR",
    "TASKRUN_CA",
    "TASKRUN_CERT",
    "TASKRUN_KEY",
    "TASKRUN_SERVER_NAME",
    "TASKRUN_LISTEN",
    "TASKRUN_STORE",
    "TASKRUN_DB",
    "TASKRUN_WORKER_ID",
    "TASKRUN_AGENTS",
    "TASKRUN_CAPACITY",
    "TASKRUN_WORKER_CERT",
    "TASKRUN_WORKER_KEY",
    "TASKRUN_LOG_LEVEL",
    "TASKRUN_LOG_FORMAT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TASKRUN_* from the outside, and a working directory without certificates."""
    for name in TASKRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(argv).parse_args(list(argv))


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# --- connection settings ---------------------------------------------------------------------


def test_settings_default_to_the_certs_directory_and_local_server() -> None:
    settings = creds.resolve_settings(env={})
    assert settings == creds.OperatorSettings(
        server="127.0.0.1:50051",
        ca=Path("certs/ca.pem"),
        cert=Path("certs/operator.pem"),
        key=Path("certs/operator-key.pem"),
        server_name="localhost",
    )


def test_settings_fall_back_to_taskrun_variables() -> None:
    env = {
        "TASKRUN_SERVER": "cp.example.com:443",
        "TASKRUN_CERTS_DIR": "/etc/taskrun",
        "TASKRUN_KEY": "/secret/me-key.pem",
    }
    settings = creds.resolve_settings(env=env)
    assert settings.server == "cp.example.com:443"
    assert settings.ca == Path("/etc/taskrun/ca.pem")
    assert settings.cert == Path("/etc/taskrun/operator.pem")
    assert settings.key == Path("/secret/me-key.pem")
    assert settings.server_name is None  # a host name is verified as it is


def test_flags_win_over_variables() -> None:
    env = {"TASKRUN_SERVER": "a:1", "TASKRUN_CA": "/env/ca.pem", "TASKRUN_SERVER_NAME": "env"}
    settings = creds.resolve_settings(server="b:2", ca="/flag/ca.pem", server_name="flag", env=env)
    assert (settings.server, settings.ca, settings.server_name) == (
        "b:2",
        Path("/flag/ca.pem"),
        "flag",
    )


def test_empty_variables_count_as_unset() -> None:
    assert creds.resolve_settings(env={"TASKRUN_SERVER": ""}).server == creds.DEFAULT_SERVER


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("[::1]:50051", "::1"),
        ("localhost:50051", "localhost"),
        ("dns:///cp.example.com:443", "cp.example.com"),
        ("ipv4:10.0.0.1:1", "10.0.0.1"),
        ("cp.example.com", "cp.example.com"),
    ],
)
def test_target_host(target: str, host: str) -> None:
    assert creds.target_host(target) == host


def test_ip_targets_verify_the_name_localhost() -> None:
    assert creds.default_server_name("10.1.2.3:50051") == "localhost"
    assert creds.default_server_name("[::1]:50051") == "localhost"
    assert creds.default_server_name("cp.internal:50051") is None


def test_global_flags_work_before_and_after_the_subcommand() -> None:
    before = parse("--server", "x:1", "--certs-dir", "/pki", "task", "list")
    after = parse("task", "list", "--server", "x:1", "--certs-dir", "/pki")
    for args in (before, after):
        settings = cli.operator_settings(args)
        assert settings.server == "x:1"
        assert settings.ca == Path("/pki/ca.pem")


def test_a_flag_before_the_subcommand_is_not_reset_by_it() -> None:
    args = parse("--server", "x:1", "task", "get", "tsk_1")
    assert cli.operator_settings(args).server == "x:1"


def test_variables_are_read_when_no_flag_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_SERVER", "env:9")
    monkeypatch.setenv("TASKRUN_CERT", "/env/op.pem")
    settings = cli.operator_settings(parse("task", "list"))
    assert settings.server == "env:9"
    assert settings.cert == Path("/env/op.pem")


def test_missing_certificate_names_the_path_and_suggests_certs_init(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["task", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "certs/ca.pem" in err
    assert "taskrun certs init" in err


def test_client_from_env_uses_the_same_resolution(tmp_path: Path) -> None:
    from taskrun.controlplane.pki import init_pki

    init_pki(tmp_path / "pki", workers=())
    client = Client.from_env(env={"TASKRUN_CERTS_DIR": str(tmp_path / "pki")})
    assert client.target == "127.0.0.1:50051"
    assert client.server_name == "localhost"
    with pytest.raises(creds.MissingCredentials, match=r"nowhere/ca\.pem"):
        Client.from_env(certs_dir="nowhere", env={})


# --- task create -----------------------------------------------------------------------------


def test_task_create_defaults() -> None:
    args = parse("task", "create", "echo")
    spec = task_cmd.task_spec_from_args(args)
    assert spec.agent == "echo"
    assert spec.input == "{}"
    assert spec.labels == {}
    assert spec.policy.max_attempts == 0  # the server's default
    assert spec.policy.timeout is None
    assert args.output == "table"
    assert args.follow is False


def test_task_create_reads_every_policy_flag() -> None:
    args = parse(
        "task", "create", "echo", "--input", '{"text": "hi"}', "--label", "team=a",
        "--label", "env=dev", "--priority", "5", "--timeout", "30", "--max-attempts", "2",
        "--idempotency-key", "k1", "--require-label", "gpu=a100", "--queue-timeout", "60",
        "--retry-on-failure", "--follow", "--output", "json",
    )  # fmt: skip
    spec = task_cmd.task_spec_from_args(args)
    assert spec.input == '{"text": "hi"}'
    assert spec.labels == {"team": "a", "env": "dev"}
    policy = spec.policy
    assert (policy.priority, policy.timeout, policy.max_attempts) == (5, 30.0, 2)
    assert policy.idempotency_key == "k1"
    assert policy.required_labels == {"gpu": "a100"}
    assert policy.queue_timeout == 60.0
    assert policy.retry_on_failure is True
    assert args.follow and args.output == "json"


def test_task_create_reads_the_model_flags(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["answer"]}')
    mcp = tmp_path / ".mcp.json"
    mcp.write_text('{"mcpServers": {"db": {"command": "db-mcp", "args": ["--ro"]}}}')
    args = parse(
        "task", "create", "claude_code", "--input", '{"prompt": "hi"}',
        "--output-schema", str(schema), "--output-retries", "4", "--system", "Be brief.",
        "--max-tokens", "300", "--temperature", "0.2", "--stop", "END", "--stop", "STOP",
        "--append-system-prompt", "Use British spelling.", "--env", "MODE=ci",
        "--mcp-config", str(mcp), "--allowed-tool", "Read", "--disallowed-tool", "Bash",
        "--max-cost", "0.25",
    )  # fmt: skip
    policy = task_cmd.task_spec_from_args(args).policy
    assert json.loads(policy.output_schema) == {"type": "object", "required": ["answer"]}
    assert (policy.output_retries, policy.max_cost_usd) == (4, 0.25)
    s = policy.model_settings
    assert (s.system_prompt, s.max_tokens, s.temperature) == ("Be brief.", 300, 0.2)
    assert s.stop_sequences == ["END", "STOP"]
    assert s.append_system_prompt == "Use British spelling."
    assert s.env == {"MODE": "ci"}
    assert json.loads(s.mcp_servers)["mcpServers"]["db"]["command"] == "db-mcp"
    assert (s.allowed_tools, s.disallowed_tools) == (["Read"], ["Bash"])


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--max-tokens", "-1"], "policy.model_settings.max_tokens"),
        (["--max-cost", "-2"], "policy.max_cost_usd"),
        (["--output-retries", "11"], "policy.output_retries"),
        (["--env", "NOEQUALS"], "policy.model_settings.env"),
        (["--env", "ANTHROPIC_API_KEY=x"], "policy.model_settings.env"),
        (["--temperature", "2.5"], "policy.model_settings.temperature"),
    ],
)
def test_task_create_refuses_bad_model_flags_naming_the_field(flags: list[str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        task_cmd.task_spec_from_args(parse("task", "create", "anthropic", *flags))
    assert err.value.field == field


def test_task_create_refuses_an_invalid_output_schema_file(tmp_path: Path) -> None:
    bad = tmp_path / "schema.json"
    bad.write_text('{"type": 12}')
    with pytest.raises(InvalidArgument, match="not a valid JSON Schema") as err:
        task_cmd.task_spec_from_args(
            parse("task", "create", "anthropic", "--output-schema", str(bad))
        )
    assert err.value.field == "policy.output_schema_json"
    with pytest.raises(InvalidArgument, match="cannot read"):
        task_cmd.task_spec_from_args(
            parse("task", "create", "anthropic", "--output-schema", str(tmp_path / "missing"))
        )


def test_task_input_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"text": "from a file"}')
    spec = task_cmd.task_spec_from_args(parse("task", "create", "echo", "--input-file", str(path)))
    assert spec.input == '{"text": "from a file"}'


def test_input_and_input_file_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("task", "create", "echo", "--input", "{}", "--input-file", "x")
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "[1]"], "input_json: must be a JSON object"),
        (["--input", "{nope"], "input_json: is not valid JSON"),
        (["--label", "novalue"], "labels: 'novalue' must have the form key=value"),
        (["--label", "bad key=v"], "labels: key 'bad key'"),
        (["--require-label", "x"], "policy.required_labels"),
        (["--max-attempts", "101"], "policy.max_attempts"),
        (["--priority", "5000"], "policy.priority"),
        (["--input-file", "/does/not/exist"], "cannot read --input-file"),
    ],
)
def test_invalid_submissions_fail_before_anything_is_sent(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No certificates exist here: reaching the network would fail differently.
    assert cli.main(["task", "create", "echo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err


def test_invalid_agent_name_is_refused_locally(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["task", "create", "Not An Agent"]) == 2
    assert "error: agent:" in capsys.readouterr().err


# --- task list / workers ---------------------------------------------------------------------


def test_status_filters_accept_repeats_and_commas() -> None:
    args = parse("task", "list", "--status", "pending,running", "--status", "FAILED")
    assert cli.flatten(args.status) == [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.FAILED]
    args = parse("workers", "list", "--status", "online")
    assert cli.flatten(args.status) == [WorkerStatus.ONLINE]


def test_revoke_is_spelled_worker_revoke_and_workers_revoke() -> None:
    for group in ("worker", "workers"):
        args = parse(group, "revoke", "worker-3", "--reason", "stolen")
        assert (args.func, args.worker_id, args.reason) == (
            worker_cmd.cmd_workers_revoke,
            "worker-3",
            "stolen",
        )
    assert parse("worker", "revoke", "worker-3").reason == ""


def test_unknown_status_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("task", "list", "--status", "done")
    assert exc.value.code == 2
    assert "unknown status 'done'" in capsys.readouterr().err


def test_task_list_defaults() -> None:
    args = parse("task", "list")
    assert (args.limit, args.page_token, args.all, args.agent, args.worker) == (
        50,
        "",
        False,
        "",
        "",
    )
    assert cli.flatten(args.status) == []


def test_a_group_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["task"]) == 2
    assert "create" in capsys.readouterr().err


# --- server and worker configuration ---------------------------------------------------------


def test_server_config_defaults_come_from_the_certs_dir() -> None:
    config = server_cmd.server_config(parse("--certs-dir", "/pki", "server"))
    assert config.listen == "127.0.0.1:50051"
    assert config.store == "sqlite:.taskrun/taskrun.db"
    assert config.ca_cert == Path("/pki/ca.pem")
    assert config.server_cert == Path("/pki/server.pem")
    assert config.server_key == Path("/pki/server-key.pem")


def test_the_public_listener_defaults_to_the_next_port_and_can_be_narrowed_or_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TASKRUN_PUBLIC_LISTEN", raising=False)
    monkeypatch.delenv("TASKRUN_PUBLIC_API", raising=False)
    config = server_cmd.server_config(parse("server", "--listen", "127.0.0.1:7000"))
    assert (config.public_address(), config.public_operator_api) == ("127.0.0.1:7001", True)
    config = server_cmd.server_config(parse("server", "--public-listen", "", "--no-public-api"))
    assert (config.public_address(), config.public_operator_api) == ("", False)
    monkeypatch.setenv("TASKRUN_PUBLIC_API", "0")
    assert server_cmd.server_config(parse("server")).public_operator_api is False


def test_server_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_LISTEN", "0.0.0.0:1")
    args = parse(
        "server", "--db", "/data/t.db", "--heartbeat-interval", "2", "--lease", "9",
        "--lease-margin", "0.7",
    )  # fmt: skip
    config = server_cmd.server_config(args)
    assert config.listen == "0.0.0.0:1"
    assert config.store == "sqlite:/data/t.db"
    assert (config.heartbeat_interval, config.lease_duration, config.lease_margin) == (
        2.0,
        9.0,
        0.7,
    )


def test_idle_heartbeat_interval_flag_default_and_off() -> None:
    assert server_cmd.server_config(parse("server")).idle_heartbeat_interval == 10.0
    config = server_cmd.server_config(parse("server", "--idle-heartbeat-interval", "0"))
    assert config.idle_heartbeat_interval == 0.0
    config = server_cmd.server_config(parse("server", "--idle-heartbeat-interval", "3"))
    assert config.idle_heartbeat_interval == 3.0


def test_an_idle_heartbeat_interval_shorter_than_the_busy_one_is_refused() -> None:
    with pytest.raises(CliError, match=r"idle_heartbeat_interval \(0.5s\) must be 0 \(off\)"):
        server_cmd.server_config(parse("server", "--idle-heartbeat-interval", "0.5"))


def test_a_heartbeat_interval_too_long_for_the_lease_is_refused() -> None:
    with pytest.raises(CliError, match=r"at most a third of lease_duration"):
        server_cmd.server_config(parse("server", "--heartbeat-interval", "2", "--lease", "4"))


@pytest.mark.parametrize(
    ("argv", "env", "store"),
    [
        (["--store", "memory"], {}, "memory"),
        (["--db", "x.db"], {}, "sqlite:x.db"),
        ([], {"TASKRUN_STORE": "memory"}, "memory"),
        ([], {"TASKRUN_DB": "/v/t.db"}, "sqlite:/v/t.db"),
        (["--store", "sqlite:a.db"], {"TASKRUN_STORE": "memory"}, "sqlite:a.db"),
        (["--store", "postgresql://tr@db:5432/taskrun"], {}, "postgresql://tr@db:5432/taskrun"),
        ([], {"TASKRUN_STORE": "postgres://tr:pw@db/taskrun"}, "postgres://tr:pw@db/taskrun"),
        ([], {}, None),
    ],
)
def test_store_resolution(
    argv: list[str], env: dict[str, str], store: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.resolve_store(parse("server", *argv)) == store


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "mysql://x"],
        ["--store", "postgresql://"],
        ["--store", "sqlite:"],
        ["--store", "memory", "--db", "x"],
    ],
)
def test_bad_store_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["server", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_server_refuses_a_nonpositive_heartbeat(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["server", "--heartbeat-interval", "0"]) == 2
    assert "heartbeat_interval" in capsys.readouterr().err


def test_server_without_certificates_says_how_to_create_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["server", "--store", "memory"]) == 2
    err = capsys.readouterr().err
    assert "certs/ca.pem does not exist" in err
    assert "taskrun certs init" in err


def test_worker_config_defaults() -> None:
    config = worker_cmd.worker_config(parse("worker", "run"))
    assert config.worker_id == "worker-1"
    assert config.server == "127.0.0.1:50051"
    assert config.agents == []
    assert config.cert_path() == Path("certs/worker-1.pem")
    assert config.key_path() == Path("certs/worker-1-key.pem")
    assert config.server_name == "localhost"


def test_worker_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_WORKER_ID", "gpu-7")
    monkeypatch.setenv("TASKRUN_CERTS_DIR", "/pki")
    args = parse(
        "--server", "cp.example.com:443", "worker", "run", "--agents", "echo, claude",
        "--capacity", "8", "--label", "gpu=a100", "--drain-timeout", "5",
    )  # fmt: skip
    config = worker_cmd.worker_config(args)
    assert config.worker_id == "gpu-7"
    assert config.agents == ["echo", "claude"]
    assert config.capacity == 8
    assert config.labels == {"gpu": "a100"}
    assert config.drain_timeout == 5.0
    assert config.ca_cert == Path("/pki/ca.pem")
    assert config.cert_path() == Path("/pki/gpu-7.pem")
    assert config.server_name == ""  # a host name: verified as it is


def test_worker_cert_flags_are_the_workers_not_the_operators() -> None:
    args = parse("--cert", "/op.pem", "worker", "run", "--cert", "/w.pem", "--key", "/w-key.pem")
    config = worker_cmd.worker_config(args)
    assert config.cert_path() == Path("/w.pem")
    assert config.key_path() == Path("/w-key.pem")
    assert cli.operator_settings(args).cert == Path("/op.pem")


def test_worker_bad_label_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worker", "run", "--label", "oops"]) == 2
    assert "error: labels:" in capsys.readouterr().err


def test_log_format_defaults_to_json_for_daemons(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.log_json(parse("server"), daemon=True) is True
    assert cli.log_json(parse("task", "list"), daemon=False) is False
    assert cli.log_json(parse("server", "--log-format", "console"), daemon=True) is False
    monkeypatch.setenv("TASKRUN_LOG_FORMAT", "console")
    assert cli.log_json(parse("server"), daemon=True) is False


# --- certs -----------------------------------------------------------------------------------


def test_certs_init_reports_files_and_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["certs", "init", "--dir", str(tmp_path / "pki"), "--worker", "w1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote  {tmp_path / 'pki' / 'w1-key.pem'}" in out
    assert "CA fingerprint: sha256:" in out
    assert cli.main(["certs", "init", "--dir", str(tmp_path / "pki"), "--worker", "w1"]) == 0
    assert f"kept   {tmp_path / 'pki' / 'ca.pem'}" in capsys.readouterr().out


def test_certs_worker_without_a_ca_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["certs", "worker", "w2", "--dir", str(tmp_path / "none")]) == 2
    assert "taskrun certs init" in capsys.readouterr().err


def test_certs_worker_refuses_a_clashing_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert cli.main(["certs", "worker", "ca", "--dir", str(tmp_path)]) == 2
    assert "clashes" in capsys.readouterr().err


# --- exit codes and server errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.NOT_FOUND, 2),
        (grpc.StatusCode.FAILED_PRECONDITION, 2),
        (grpc.StatusCode.ALREADY_EXISTS, 2),
        (grpc.StatusCode.PERMISSION_DENIED, 2),
        (grpc.StatusCode.UNAVAILABLE, 3),
        (grpc.StatusCode.CANCELLED, 3),  # the server ended the call as it stopped: try again
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_exit_code_for_status(code: grpc.StatusCode, exit_code: int) -> None:
    assert exit_code_for_status(code) == exit_code


def test_exit_code_for_a_followed_task() -> None:
    assert exit_code_for_task(TaskStatus.COMPLETED) == 0
    assert exit_code_for_task(TaskStatus.FAILED) == 1
    assert exit_code_for_task(TaskStatus.CANCELLED) == 130


def test_unavailable_asks_whether_the_server_runs() -> None:
    text = describe_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "refused"), "h:1")
    assert text.startswith("error: UNAVAILABLE: refused\n")
    assert "is the server running at h:1?" in text


def test_a_call_the_server_cancelled_says_so_and_what_may_have_happened() -> None:
    text = describe_rpc_error(rpc_error(grpc.StatusCode.CANCELLED, "CANCELLED"), "h:1")
    assert text.startswith("error: CANCELLED: CANCELLED\nthe server at h:1 ended the call")
    assert "whether it took effect is unknown" in text


@pytest.mark.parametrize(
    ("code", "exit_code"), [(grpc.StatusCode.NOT_FOUND, 2), (grpc.StatusCode.UNAVAILABLE, 3)]
)
def test_server_errors_are_one_line_without_traceback(
    code: grpc.StatusCode,
    exit_code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from taskrun.controlplane.pki import init_pki

    init_pki(tmp_path / "certs", workers=())

    async def get_task_tree(self: Client, task_id: str) -> None:
        raise rpc_error(code, f"task_id: no task {task_id!r}")

    monkeypatch.setattr(Client, "get_task_tree", get_task_tree)  # what `task get` calls
    full_id = "tsk_" + "0" * 26  # a whole id is sent as it is (a prefix would be looked up)
    assert cli.main(["task", "get", full_id]) == exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"error: {code.name}: task_id: no task '{full_id}'\n")
    assert "Traceback" not in err


# --- dev -------------------------------------------------------------------------------------


def test_dev_defaults() -> None:
    args = parse("dev")
    assert (args.workers, args.agents, args.dir, args.listen, args.store) == (
        2,
        "echo",
        ".taskrun/dev",
        "127.0.0.1:50051",
        None,
    )


def test_dev_listen_port_zero_is_left_to_the_server() -> None:
    # the server binds port 0 itself and names the ports in its ready file: a port picked
    # here could be taken by another process before the server binds it
    assert resolve_listen("127.0.0.1:0") == ("127.0.0.1:0", "127.0.0.1:0")
    assert resolve_listen("0.0.0.0:7000") == ("0.0.0.0:7000", "127.0.0.1:7000")
    with pytest.raises(ValueError, match="host:port"):
        split_host_port("nonsense")


def test_dev_ready_message_gives_copyable_commands() -> None:
    text = ready_message("127.0.0.1:5000", Path("/tmp/dev dir/certs"), ["worker-1"], "echo")
    assert text.startswith("taskrun dev is ready")
    line = (
        "TASKRUN_SERVER=127.0.0.1:5000 TASKRUN_CERTS_DIR='/tmp/dev dir/certs' taskrun task create"
    )
    assert line in text
    assert "--follow" in text
    assert "taskrun token create" in text  # how another machine's worker joins


def test_the_http_api_is_off_unless_an_address_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKRUN_HTTP_LISTEN", raising=False)
    assert server_cmd.server_config(parse("server")).http_listen == ""
    config = server_cmd.server_config(parse("server", "--http-listen", "0.0.0.0:8443"))
    assert config.http_listen == "0.0.0.0:8443"
    monkeypatch.setenv("TASKRUN_HTTP_LISTEN", "127.0.0.1:9443")
    assert server_cmd.server_config(parse("server")).http_listen == "127.0.0.1:9443"


def test_webhook_networks_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TASKRUN_WEBHOOK_ALLOW_NETWORKS", raising=False)
    assert server_cmd.server_config(parse("server")).webhook_allow_networks == []
    args = parse(
        "server", "--webhook-allow-network", "10.0.0.0/8", "--webhook-allow-network", "::1/128"
    )
    assert server_cmd.server_config(args).webhook_allow_networks == ["10.0.0.0/8", "::1/128"]
    monkeypatch.setenv("TASKRUN_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8, 192.168.0.0/16")
    assert server_cmd.server_config(parse("server")).webhook_allow_networks == [
        "127.0.0.0/8",
        "192.168.0.0/16",
    ]
    assert cli.main(["server", "--webhook-allow-network", "intranet"]) == 2
    assert "'intranet' is not a network" in capsys.readouterr().err


def test_webhook_create_refuses_an_unknown_event_before_calling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse("webhook", "create", "https://x.example/", "--event", "task.finished")
    err = capsys.readouterr().err
    assert "unknown event 'task.finished'" in err and "schedule.fired" in err


@pytest.mark.parametrize("group", ["worker", "workers"])
def test_worker_list_and_get_are_spelled_both_ways(group: str) -> None:
    listed = parse(group, "list", "--status", "online", "-o", "json")
    assert listed.func is worker_cmd.cmd_workers_list
    assert (listed.status, listed.output) == ([[WorkerStatus.ONLINE]], "json")
    shown = parse(group, "get", "worker-1")
    assert (shown.func, shown.worker_id) == (worker_cmd.cmd_workers_get, "worker-1")
