"""Admin forms: reading a posted form safely, and carrying what was typed and what was wrong.

A form shown again with its errors is answered 200: the exchange worked, and
browsers log a 4xx document as a console error (4xx is kept for what is refused
outright). Fields are validated by the CLI's own parser, so both refuse the same
values with the same sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from relay_core.errors import BadRequest, RelayError
from relay_core.options import Options, parse_option, to_text

MAX_FORM_BYTES = 64 * 1024
MAX_FIELDS = 100


class UnsupportedForm(RelayError):
    status = 415


@dataclass
class FormState:
    """What a card shows: its field values, an error per field, and one for the card."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    error: str = ""  # about the whole card (a consistency rule, a refused connection)
    result: str = ""  # a success sentence shown in the card
    result_ok: bool = True

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.error)

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    @classmethod
    def from_options(cls, options: Options, names: list[str]) -> "FormState":
        return cls(values={name: to_text(getattr(options, name)) for name in names})


async def read_form(request: Request) -> dict[str, str]:
    """The posted fields (the last value of a repeated name wins); read once per request."""
    cached = getattr(request.state, "form", None)
    if cached is not None:
        return cached
    from relay_web.api import read_capped_body  # the API's capped reader: one implementation

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise UnsupportedForm("This page accepts only HTML form posts (application/x-www-form-urlencoded).")
    body = await read_capped_body(request, MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise BadRequest("The form was not sent as UTF-8.") from None
    except ValueError:
        raise BadRequest(f"The form has more than {MAX_FIELDS} fields.") from None
    form = {name: value for name, value in pairs}
    request.state.form = form
    request.state.form_pairs = pairs
    return form


async def read_form_values(request: Request, name: str) -> list[str]:
    """Every value posted under ``name``, in order (a list of ticked checkboxes)."""
    await read_form(request)
    return [value for key, value in request.state.form_pairs if key == name]


def parse_fields(form: dict[str, str], labels: dict[str, str]) -> tuple[dict[str, Any], FormState]:
    """Validate each named setting; the typed values, and the state to show back."""
    state = FormState(values={name: form.get(name, "") for name in labels})
    values: dict[str, Any] = {}
    for name, label in labels.items():
        try:
            values[name] = parse_option(name, form.get(name, ""), label)
        except BadRequest as exc:
            state.errors[name] = exc.message
    return values, state


def confirmed(form: dict[str, str]) -> bool:
    """A dangerous action's second step: app.js sets it after confirm(); without JS a page asks."""
    return form.get("confirmed") == "yes"
