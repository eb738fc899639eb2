"""Current date and time in a given IANA timezone (the model has no clock)."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .functions import tool


class CurrentTimeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(default="UTC", description="IANA timezone name, e.g. 'Europe/Paris' or "
                                                     "'America/New_York'. Defaults to UTC.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        value = value.strip()
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}; use an IANA name such as 'Europe/Paris'") from None
        return value


@tool(timeout=5.0)
def current_time(args: CurrentTimeInput) -> str:
    """Get the current date, time, UTC offset and weekday in a timezone.
    Use it whenever the answer depends on today's date or the time of day."""
    now = datetime.now(ZoneInfo(args.timezone))
    iso = now.isoformat(timespec="seconds")
    return json.dumps({"timezone": args.timezone, "iso": iso, "utc_offset": iso[len("YYYY-MM-DDTHH:MM:SS"):],
                       "weekday": now.strftime("%A")})  # utc_offset: "+HH:MM"
