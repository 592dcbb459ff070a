"""pbx.config: the default file loads; bad files name the file, the key and the reason."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pbx.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"

GOOD_ROUTE = '[[routes]]\nname = "r"\nto_user = "*99"\napp_params = { url = "http://127.0.0.1:8080/ivr/step" }\n'


def test_default_file_loads() -> None:
    settings = load_config(str(ROOT / DEFAULT_CONFIG_PATH))
    assert isinstance(settings, Settings)
    assert settings.sip.host_port == ("127.0.0.1", 5060)
    assert settings.media.port_range == (20000, 29999)
    assert settings.media.port_pool == 64
    assert settings.source_path.endswith("pbx.toml")
    names = [r.name for r in settings.routes]
    assert "step_ivr" in names
    route = settings.routes[names.index("step_ivr")]
    assert route.app_params.url == "http://127.0.0.1:8080/ivr/step"


def test_empty_file_gives_defaults() -> None:
    settings = parse_config("", "empty.toml")
    assert settings.sip.listen == "127.0.0.1:5060"
    assert settings.routes == []


def test_short_form_route_accepted() -> None:
    settings = parse_config(GOOD_ROUTE, "f.toml")
    assert settings.routes[0].to_user == "*99"
    assert settings.routes[0].match == {}


def test_ipv6_listen_accepted() -> None:
    settings = parse_config('[sip]\nlisten = "[::1]:5070"\n', "f.toml")
    assert settings.sip.host_port == ("::1", 5070)


BAD = {
    "bad_toml": ("[sip\nlisten = 1\n", None, "invalid TOML"),
    "unknown_sip_key": ("[sip]\nbogus = 1\n", "sip.bogus", "Extra inputs"),
    "unknown_section": ("[nonsense]\na = 1\n", "nonsense", "Extra inputs"),
    "bad_listen": ('[sip]\nlisten = "nohost"\n', "sip.listen", "host:port"),
    "bad_listen_port": ('[sip]\nlisten = "127.0.0.1:70000"\n', "sip.listen", "out of range"),
    "rtp_ports_reversed": ('[media]\nrtp_ports = "30000-20000"\n', "media.rtp_ports", "1024 <= low"),
    "rtp_ports_garbage": ('[media]\nrtp_ports = "lots"\n', "media.rtp_ports", "low-high"),
    "rtp_ports_low": ('[media]\nrtp_ports = "80-2000"\n', "media.rtp_ports", "1024 <= low"),
    "route_without_condition": (
        '[[routes]]\nname = "r"\napp_params = { url = "http://x" }\n',
        "routes[0]",
        "needs 'match' or 'to_user'",
    ),
    "bad_regex": (
        '[[routes]]\nname = "r"\nmatch = { "to.user" = "(" }\napp_params = { url = "http://x" }\n',
        "routes[0].match",
        "bad regex",
    ),
    "non_http_url": (
        '[[routes]]\nname = "r"\nto_user = "1"\napp_params = { url = "ftp://x" }\n',
        "routes[0].app_params.url",
        "http(s) URL",
    ),
    "unknown_match_field": (
        '[[routes]]\nname = "r"\nmatch = { "to.bogus" = "x" }\napp_params = { url = "http://x" }\n',
        "routes[0].match",
        "unknown match field 'to.bogus'",
    ),
    "missing_url": (
        '[[routes]]\nname = "r"\nto_user = "1"\napp_params = { mode = "step" }\n',
        "routes[0].app_params.url",
        "Field required",
    ),
    "second_route_bad": (
        GOOD_ROUTE + '[[routes]]\nname = "s"\nto_user = "2"\napp_params = { url = "mailto:x" }\n',
        "routes[1].app_params.url",
        "http(s) URL",
    ),
    "bad_contact": ('[users.1001]\ncontact = "tel:1001"\n', "users.1001.contact", "sip: URI"),
    "bad_log_level": ('[logging]\nlevel = "LOUD"\n', "logging.level", "DEBUG"),
    "zero_wait_grace": ("[sessions]\nwait_grace_ms = 0\n", "sessions.wait_grace_ms",
                        "greater than 0"),
    "zero_port_pool": ("[media]\nport_pool = 0\n", "media.port_pool", "greater than 0"),
    "huge_port_pool": ("[media]\nport_pool = 5000\n", "media.port_pool",
                       "less than or equal to 4096"),
    "bad_rtp_socket": ('[media]\nrtp_socket = "both"\n', "media.rtp_socket", "per_leg"),
    "odd_shared_port": ("[media]\nshared_port = 30001\n", "media.shared_port", "even port"),
    # Passed validation, then failed at start-up with a traceback (a name lookup), or
    # left every media worker without a port (review of config and start-up):
    "listen_not_an_ip": ('[sip]\nlisten = "999.1.1.1:5060"\n', "sip.listen", "IP address"),
    "listen_a_name": ('[sip]\nlisten = "no.such.host.invalid:5060"\n', "sip.listen",
                      "IP address"),
    "advertised_garbage": ('[sip]\nadvertised = "bad host:5060"\n', "sip.advertised",
                           "host name"),
    # One validator (pbx.settings.base.NetworkList) for every list of networks:
    "bad_rate_limit_exempt": ('[sip]\nrate_limit_exempt = ["10.0.0.0/8", "nope"]\n',
                              "sip.rate_limit_exempt", "'nope' does not appear"),
    "bad_trusted_network": ('[policy]\ntrusted_networks = ["x"]\n', "policy.trusted_networks",
                            "'x' does not appear"),
    "bad_worker_rtp_ips": ('[media]\nworker_rtp_ips = ["1.2.3.4/40"]\n',
                           "media.worker_rtp_ips", "does not appear"),
    "rtp_ip_typo": ('[media]\nrtp_ip = "10.0.0.l"\n', "media.rtp_ip", "IP address"),
    # Dropped between two of its own heartbeats: every worker would flap.
    "media_expiry_short": ("[media]\nheartbeat_ms = 2000\nexpiry_ms = 1500\n", "media",
                           "at least twice heartbeat_ms"),
    "ivr_expiry_short": ("[ivr]\nheartbeat_ms = 2000\nexpiry_ms = 3000\n", "ivr",
                         "at least twice heartbeat_ms"),
}


def test_an_advertised_host_name_is_accepted() -> None:
    settings = parse_config('[sip]\nadvertised = "pbx.example.net:5060"\n', "f.toml")
    assert settings.sip.advertised_host_port == ("pbx.example.net", 5060)


def test_a_config_file_not_in_utf8_names_the_file(tmp_path: Path) -> None:
    """A Latin-1 byte (an old editor's '# café') raised UnicodeDecodeError: a traceback at
    start-up, a 500 from /api/reload."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[policy]\nanonymous_caller_id = "anonymous" # café\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_names_file_key_reason(name: str) -> None:
    text, key, reason = BAD[name]
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/bad-pbx.toml")
    message = str(info.value)
    assert message.startswith("/etc/bad-pbx.toml: ")
    if key is not None:
        assert f"key {key}:" in message
    assert reason in message


def test_bad_toml_gives_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[sip]\nlisten = "x\n', "f.toml")
    assert "line 2" in str(info.value)


def test_bad_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[sip]\nbogus = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert "sip.bogus" in str(info.value)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_env_var_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[sip]\nlisten = "127.0.0.1:5999"\n')
    monkeypatch.setenv(CONFIG_ENV, str(path))
    settings = load_config()
    assert settings.sip.host_port == ("127.0.0.1", 5999)
    assert settings.source_path == str(path)


def test_env_var_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gone.toml"
    monkeypatch.setenv(CONFIG_ENV, str(path))
    with pytest.raises(ConfigError, match="gone.toml"):
        load_config()


def test_explicit_path_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "gone.toml"))
    settings = load_config(str(ROOT / DEFAULT_CONFIG_PATH))
    assert settings.routes


def test_default_path_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(ROOT)
    settings = load_config()
    assert settings.source_path == DEFAULT_CONFIG_PATH


@pytest.mark.parametrize("program", ["pbx-front", "pbx-media", "pbx-ivr"])
@pytest.mark.parametrize(
    "text,key,reason",
    [
        ("[sip]\nbogus = 1\n", "sip.bogus", "Extra inputs"),
        ('[media]\nrtp_ports = "9-8"\n', "media.rtp_ports", "1024 <= low"),
    ],
)
def test_program_exits_2_on_bad_config(
    program: str, text: str, key: str, reason: str, tmp_path: Path
) -> None:
    exe = VENV_BIN / program
    assert exe.exists(), f"{exe} not installed (make install)"
    path = tmp_path / "bad.toml"
    path.write_text(text)
    env = {**os.environ, CONFIG_ENV: str(path)}
    proc = subprocess.run(
        [str(exe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    assert key in proc.stderr
    assert reason in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("program", ["pbx-front", "pbx-media", "pbx-ivr"])
def test_program_exits_2_on_missing_config(program: str, tmp_path: Path) -> None:
    exe = VENV_BIN / program
    assert exe.exists(), f"{exe} not installed (make install)"
    path = tmp_path / "missing.toml"
    env = {**os.environ, CONFIG_ENV: str(path)}
    proc = subprocess.run(
        [str(exe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    assert "Traceback" not in proc.stderr



def test_the_perf_config_is_the_default_one_with_loopback_exempt() -> None:
    """perf/pbx-perf.toml (`make run-perf`) must not drift from config/pbx.toml: the
    only difference is the loopback exemption from the per-source limits."""
    default = load_config(str(ROOT / "config" / "pbx.toml")).model_dump()
    perf = load_config(str(ROOT / "perf" / "pbx-perf.toml")).model_dump()
    assert perf["sip"].pop("rate_limit_exempt") == ["127.0.0.0/8"]
    assert default["sip"].pop("rate_limit_exempt") == []
    assert perf == default
