"""The librdkafka configuration every Kafka client of the product starts from.

One place turns the settings into ``bootstrap.servers`` and the security keys
(``security.protocol``, ``sasl.*``, ``ssl.ca.location``), so the ingest producer, the
dataflow's consumers, admin clients and producers, the topic tool and the local tools
all reach the brokers the same way: adding TLS or SASL is a settings change, never an
edit at each client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetpulse.errors import ConfigError
from fleetpulse.settings import Settings, env_name

__all__ = ["kafka_config"]


def kafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """``bootstrap.servers`` and the security keys of ``settings``, then ``extra``.

    ``extra`` takes librdkafka's dotted keys through a dict (``**{"linger.ms": 5}``)
    and may not override the security keys. Raises :class:`ConfigError` when the CA
    file is named but missing (librdkafka's own message would not name the setting).
    """
    s = settings
    config: dict[str, Any] = {
        "bootstrap.servers": s.kafka_bootstrap_servers,
        "security.protocol": s.kafka_security_protocol.lower(),
    }
    if s.kafka_security_protocol.startswith("SASL_"):
        config["sasl.mechanism"] = s.kafka_sasl_mechanism
        config["sasl.username"] = s.kafka_sasl_username
        config["sasl.password"] = s.kafka_sasl_password
    if s.kafka_ca_file:
        if not Path(s.kafka_ca_file).is_file():
            raise ConfigError(
                f"{env_name('kafka_ca_file')}={s.kafka_ca_file!r}: no such file (the PEM of "
                "the CA that signed the brokers' certificates)"
            )
        config["ssl.ca.location"] = s.kafka_ca_file
    clash = sorted(k for k in extra if k in config and k != "bootstrap.servers")
    if clash:
        raise ValueError(f"security keys come from the settings, not from callers: {clash}")
    config.update(extra)
    return config
