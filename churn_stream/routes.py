"""The part of a URL that carries a user id, in both HTTP APIs.

Starlette's ``path`` convertor matches ``.*`` inside ``^...$``: ``.`` stops at a line break
and ``$`` matches just before a final one, so ``/predict/u1%0A`` was routed as user ``u1`` (an
id rewritten, where the rule is to refuse it) and ``/predict/a%0Ab`` matched no route at all.
This convertor takes any text, "/" and line breaks included, and leaves judging it to the
user-id rule (``events.UserId``), which answers 422 naming the field.
"""

from starlette.convertors import Convertor, register_url_convertor


class AnyText(Convertor[str]):
    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_text", AnyText())
USER_ID = "{user_id:any_text}"
"""The path parameter ``user_id`` as any text: ``f"/predict/{USER_ID}"``."""
