"""Security defaults, as the command line and the configs set them: loopback only, no pickle
weights and no remote code unless asked for, a bounded request body, the API key compared in
constant time."""

from __future__ import annotations

import inspect

from pagoda.adapters.cli import build_parser
from pagoda.adapters.openai import ServerSettings
from pagoda.adapters.openai.app import ApiKeyMiddleware
from pagoda.backend import EngineConfig


def test_servers_bind_loopback_and_run_no_untrusted_code_by_default():
    parser = build_parser()
    for command in (["serve"], ["worker"]):
        args = parser.parse_args(command)
        assert args.host == "127.0.0.1"
        assert args.allow_pickle_weights is False
        assert args.trust_remote_code is False
        assert 0 < args.max_request_bytes <= 64 * 1024**2
    assert ServerSettings().host == "127.0.0.1"
    config = EngineConfig()
    assert config.allow_pickle_weights is False and config.trust_remote_code is False


def test_api_key_is_compared_in_constant_time():
    assert "hmac.compare_digest" in inspect.getsource(ApiKeyMiddleware.__call__)
