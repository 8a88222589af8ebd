"""The supported presentation contexts each association gets (dicom_node/scp.py: _SupportedContexts)."""

from __future__ import annotations

import copy

from pynetdicom import AE, StoragePresentationContexts, build_context
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import PositronEmissionTomographyImageStorage, Verification

from dicom_node.scp import GuardedAssociationServer, _SupportedContexts


def _supported() -> list:
    ae = AE()
    ae.supported_contexts = StoragePresentationContexts  # the AE builds its own context objects from these
    ae.add_supported_context(Verification)
    return ae.supported_contexts


def test_each_association_gets_its_own_contexts_without_rebuilding_uids() -> None:
    originals = _supported()
    contexts = _SupportedContexts(originals)
    copies = copy.deepcopy(contexts)
    assert type(copies) is list and len(copies) == len(originals) > 100
    for original, twin in zip(originals, copies):
        assert twin is not original
        # UIDs are shared (a deep copy would build and validate each again: the cost this avoids) ...
        assert twin.abstract_syntax is original.abstract_syntax
        assert all(a is b for a, b in zip(twin.transfer_syntax, original.transfer_syntax))
        assert (twin.scu_role, twin.scp_role) == (original.scu_role, original.scp_role)
        # ... but the lists are the association's own: changing one leaves the server's contexts as they were
        assert twin.transfer_syntax == original.transfer_syntax
        assert twin._transfer_syntax is not original._transfer_syntax
    before = list(originals[0].transfer_syntax)
    copies[0]._transfer_syntax.append("1.2.3.4")
    assert originals[0].transfer_syntax == before


def test_negotiation_on_the_copies_is_the_negotiation_on_the_originals() -> None:
    originals = _supported()
    copies = copy.deepcopy(_SupportedContexts(originals))
    requested = [build_context(PositronEmissionTomographyImageStorage), build_context("1.2.3.4.5.6"),
                 build_context(Verification)]
    for i, cx in enumerate(requested):
        cx.context_id = 2 * i + 1
    expected, _ = negotiate_as_acceptor(requested, originals)
    got, _ = negotiate_as_acceptor(requested, copies)
    assert [(c.context_id, c.result, c.transfer_syntax) for c in got] == \
        [(c.context_id, c.result, c.transfer_syntax) for c in expected]
    assert [c.result for c in got] == [0x00, 0x03, 0x00]


def test_the_server_keeps_its_contexts_in_the_cheap_copying_list() -> None:
    server = GuardedAssociationServer.__new__(GuardedAssociationServer)
    server.contexts = _supported()  # what pynetdicom's __init__ does
    assert isinstance(server.contexts, _SupportedContexts)
