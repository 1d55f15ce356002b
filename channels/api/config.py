"""The `channels.api` section of swarmdesk.yaml: the HTTP API for custom integrations.

The API key never lives in the file: the section names the environment variable holding it.
"""

from __future__ import annotations

from pydantic import Field

from config_section import ConfigSection


class ApiSettings(ConfigSection):
    enabled: bool = True
    account: str = "default"
    api_key_env: str = "SWARMDESK_API_KEY"
    dev_api_key: str = Field(
        "dev-key", description="accepted only when the key variable is unset and host is loopback"
    )
