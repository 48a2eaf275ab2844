"""tether client for Python (asyncio, standard library only).

    import asyncio, tether

    async def main():
        async with tether.Client("127.0.0.1", 7300, "sensor-1") as c:
            await c.send(b"hello")
            async for ev in c:
                if isinstance(ev, tether.Message):
                    print(ev.payload)

See README.md. The wire protocol is docs/PROTOCOL.md; ``tether.conn.Conn`` is the sans-IO
state machine the client drives.
"""

from .client import (
    Backoff, Client, ClientStopped, Connected, Disconnected, Reconnecting, Stopped,
    apply_socket_options, socket_options, tls_context,
)
from .codec import CloseCode, ProtocolError, client_id_problem
from .conn import Conn, ConnConfig, Disconnect, Message, Resumed, SendError, SessionLost
from .session import Session, SessionConfig

__all__ = [
    "Backoff", "Client", "ClientStopped", "CloseCode", "Conn", "ConnConfig", "Connected",
    "Disconnect", "Disconnected", "Message", "ProtocolError", "Reconnecting", "Resumed",
    "SendError", "Session", "SessionConfig", "SessionLost", "Stopped", "apply_socket_options",
    "client_id_problem", "socket_options", "tls_context",
]
