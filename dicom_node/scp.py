"""Wiring of the Storage/Verification SCP: which SOP classes and transfer syntaxes, limits, handlers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.handlers import (
    IMAGE_STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    ReceiveContext,
    handle_accepted,
    handle_conn_close,
    handle_conn_open,
    handle_echo,
    handle_rejected,
    handle_store,
)
from dicom_node.settings import NodeSettings

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)


def make_ae(settings: NodeSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.network_timeout_s
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for uid in IMAGE_STORAGE_CLASSES:
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    return ae


def start_scp(settings: NodeSettings, ctx: ReceiveContext) -> ThreadedAssociationServer:
    """Start listening (non-blocking); ``server.server_address[1]`` is the port (useful with port 0)."""
    ae = make_ae(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]
    server = ae.start_server((settings.bind_address, settings.port), block=False, evt_handlers=handlers)
    logger.info("listening as %s on %s:%d", settings.ae_title, settings.bind_address, server.server_address[1])
    return server
