"""Optional API keys, checked in constant time."""

import hmac


class ApiKeyChecker:
    """Accepts `Authorization: Bearer <key>` for any configured key; with no keys configured, accepts all."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """True if the Authorization header carries an accepted key (or no keys are configured)."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare against every key, without stopping at a match, so timing says nothing about which key matched
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok and bool(presented)
