"""SoftHSM-specific behaviour of the PKCS#11 store: key attributes, processes, threads, sessions, errors."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeReadOnly, AttributeSensitive, PKCS11Error

from hsm_keys.encoding.jwk import jwk_thumbprint, jwk_thumbprint_bytes
from hsm_keys.errors import (
    ConfigurationError,
    HsmKeysError,
    InvalidInputError,
    KeyNotFoundError,
    LoginError,
    TokenNotFoundError,
    UnsupportedAlgorithmError,
)
from hsm_keys.keystore import _cryptoki
from hsm_keys.keystore.base import make_label
from hsm_keys.keystore.pkcs11 import Pin, Pkcs11KeyStore, Pkcs11Uri
from hsm_keys.types import Binding, KeySpec, SignatureAlgorithm

pytestmark = pytest.mark.softhsm
ACCOUNT = "210987654321"


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (threads into C must not take the test process down)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )


def private_object(store: Pkcs11KeyStore, kid: str) -> Any:
    with store.pool.borrow() as pooled:
        return pooled.session, store._private_key(pooled, store.get(kid))


def test_private_keys_are_token_sensitive_non_extractable_sign_only(softhsm_store: Pkcs11KeyStore) -> None:
    info = softhsm_store.generate(KeySpec.EC_P256, Binding("attrs", ACCOUNT))
    with softhsm_store.pool.borrow() as pooled:
        key = softhsm_store._private_key(pooled, info)
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.PRIVATE] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.SIGN] is True
        for usage in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE, Attribute.SIGN_RECOVER):
            assert key[usage] is False
        assert key[Attribute.COPYABLE] is False
        assert key[Attribute.LABEL] == info.label
        with pytest.raises(AttributeSensitive):
            _ = key[Attribute.VALUE]
        # The token, not only our template, keeps the key inside: these can never be loosened.
        for attribute, loosened in (
            (Attribute.SENSITIVE, False),
            (Attribute.EXTRACTABLE, True),
            (Attribute.COPYABLE, True),
        ):
            with pytest.raises(AttributeReadOnly):
                key[attribute] = loosened
        with pytest.raises(PKCS11Error):
            key.copy({})
        publics = list(
            pooled.session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key.id})
        )
        assert len(publics) == 1 and publics[0][Attribute.VERIFY] is True
        assert publics[0][Attribute.VERIFY_RECOVER] is False


def test_rsa_private_exponent_is_not_readable(softhsm_store: Pkcs11KeyStore) -> None:
    info = softhsm_store.generate(KeySpec.RSA_2048, Binding("rsa-export", ACCOUNT))
    with softhsm_store.pool.borrow() as pooled:
        key = softhsm_store._private_key(pooled, info)
        with pytest.raises(AttributeSensitive):
            _ = key[Attribute.PRIVATE_EXPONENT]


def test_keys_are_visible_from_a_fresh_process(softhsm_store: Pkcs11KeyStore) -> None:
    info = softhsm_store.generate(KeySpec.ED25519, Binding("other-process", ACCOUNT))
    result = run_python(
        f"""
        from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore
        from hsm_keys.types import Binding
        with Pkcs11KeyStore() as store:
            found = store.find(Binding("OTHER-PROCESS", "{ACCOUNT}"))
            print(found.kid)
            print(store.sign(found.kid, b"from a child", "EdDSA").hex())
        """
    )
    assert result.returncode == 0, result.stderr
    kid, signature = result.stdout.split()
    assert kid == info.kid
    info.public_key.verify(bytes.fromhex(signature), b"from a child")  # type: ignore[call-arg, union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("spec,alg", [(KeySpec.EC_P256, "ES256"), (KeySpec.RSA_2048, "PS256")])
def test_sixteen_threads_sign_concurrently_without_crashing(
    softhsm_store: Pkcs11KeyStore, spec: KeySpec, alg: str
) -> None:
    info = softhsm_store.generate(spec, Binding(f"threads-{alg}", ACCOUNT))
    result = run_python(
        f"""
        import threading
        from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore
        from hsm_keys.keystore.software import verify_signature
        from hsm_keys.types import SignatureAlgorithm
        alg = SignatureAlgorithm.parse("{alg}")
        store = Pkcs11KeyStore(pool_size=16)
        info = store.get("{info.kid}")
        failures, counts = [], [0] * 16
        def work(worker):
            for i in range(300):
                message = f"{{worker}}/{{i}}".encode()
                signature = store.sign(info.kid, message, alg)
                if not verify_signature(info.public_key, signature, message, alg):
                    failures.append((worker, i))
                counts[worker] += 1
        threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(sum(counts), len(failures), store.pool.stats().high_water)
        store.close()
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    total, failures, high_water = map(int, result.stdout.split())
    assert (total, failures) == (16 * 300, 0)
    assert 1 < high_water <= 16


def test_open_close_a_hundred_times_leaks_no_session_and_keeps_login(pkcs11_env: dict[str, str]) -> None:
    handles: list[int] = []
    for _ in range(100):
        with Pkcs11KeyStore() as store:
            with store.pool.borrow() as pooled:
                handles.append(int(pooled.session.handle))
            lib = store._lib
    # every session this loop opened is closed again (the module says the handles are invalid)
    assert all(lib.session_state(handle) is None for handle in handles)
    # and a new store still logs in and works, with its session in the logged-in state
    with Pkcs11KeyStore() as store:
        info = store.generate(KeySpec.EC_P256, Binding("after-loop", ACCOUNT))
        store.sign(info.kid, b"x", "ES256")
        with store.pool.borrow() as pooled:
            assert lib.session_state(pooled.session.handle) == _cryptoki.CKS_RW_USER_FUNCTIONS
        store.destroy(info.kid)


def test_two_stores_share_the_login_and_closing_one_keeps_the_other_working(
    pkcs11_env: dict[str, str],
) -> None:
    first, second = Pkcs11KeyStore(), Pkcs11KeyStore()
    try:
        info = first.generate(KeySpec.EC_P256, Binding("shared-login", ACCOUNT))
        second.close()
        first.sign(info.kid, b"still logged in", "ES256")
        first.destroy(info.kid)
    finally:
        first.close()
        second.close()


def test_missing_token_lists_the_labels_seen_and_the_config(pkcs11_env: dict[str, str]) -> None:
    with pytest.raises(TokenNotFoundError) as raised:
        Pkcs11KeyStore(token_label="no-such-token")
    message = str(raised.value)
    assert "no-such-token" in message
    assert repr(pkcs11_env["HSM_KEYS_TOKEN_LABEL"]) in message
    assert pkcs11_env["SOFTHSM2_CONF"] in message


def test_wrong_pin_is_a_login_error_that_does_not_reveal_the_pin(pkcs11_env: dict[str, str]) -> None:
    wrong = "wrong-pin-7f3a9c"
    with pytest.raises(LoginError) as raised:
        Pkcs11KeyStore(pin=wrong)
    text = str(raised.value) + repr(raised.value) + str(raised.value.__cause__ or "")
    assert wrong not in text
    # the right PIN still works afterwards (SoftHSM has no lockout by default)
    Pkcs11KeyStore().close()


def test_pin_never_appears_in_reprs(pkcs11_env: dict[str, str]) -> None:
    pin = pkcs11_env["HSM_KEYS_PIN"]
    with Pkcs11KeyStore() as store:
        assert pin not in repr(store)
        assert pin not in repr(vars(store))
    assert pin not in repr(Pin(pin)) and pin not in str(Pin(pin))
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(Pin(pin))


def test_configured_by_rfc7512_uri(pkcs11_env: dict[str, str], tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(pkcs11_env["HSM_KEYS_PIN"] + "\n")
    uri = (
        f"pkcs11:token={pkcs11_env['HSM_KEYS_TOKEN_LABEL'].replace('-', '%2D')};object=ignored"
        f"?module-path={pkcs11_env['HSM_KEYS_PKCS11_MODULE']}&pin-source=file:{pin_file}"
    )
    parsed = Pkcs11Uri.parse(uri)
    assert parsed.token == pkcs11_env["HSM_KEYS_TOKEN_LABEL"]
    assert parsed.module_path == pkcs11_env["HSM_KEYS_PKCS11_MODULE"]
    with Pkcs11KeyStore(module="", token_label="", pin=None, uri=uri) as store:
        assert store.token_label == pkcs11_env["HSM_KEYS_TOKEN_LABEL"]


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs12:token=x",
        "pkcs11:token",
        "pkcs11:token=x?pin-source=/no/such/file",
        "pkcs11:=x",
        "pkcs11:token=x;slot-id=0",
        "pkcs11:token=x;manufacturer=SoftHSM%20project",
        "pkcs11:token=x?module-name=softhsm2",
    ],
)
def test_bad_uris_are_configuration_errors(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        Pkcs11Uri.parse(uri)


@pytest.mark.parametrize(
    "uri", ["pkcs11:token=x?pin-value:S3cretPIN", "pkcs11:token=x?S3cretPIN", "pkcs11:S3cretPIN;token=x"]
)
def test_malformed_uri_errors_never_echo_the_text(uri: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Pkcs11Uri.parse(uri)
    assert "S3cret" not in str(raised.value)


def test_a_wrong_pin_is_refused_while_another_store_holds_the_login(pkcs11_env: dict[str, str]) -> None:
    # PKCS#11 login belongs to the process: the token answers USER_ALREADY_LOGGED_IN without
    # looking at the PIN, so the store must compare it with the PIN that logged in.
    with Pkcs11KeyStore() as good:
        with pytest.raises(LoginError, match="different PIN") as raised:
            Pkcs11KeyStore(pin="not-the-pin")
        assert "not-the-pin" not in str(raised.value)
        with Pkcs11KeyStore(pin=pkcs11_env["HSM_KEYS_PIN"]) as same:
            assert same.list_keys() == good.list_keys()


def test_cloudhsm_style_pin_is_passed_unchanged(pkcs11_env: dict[str, str]) -> None:
    # CloudHSM PINs are "user:password"; SoftHSM refuses this one, and the message must not echo it.
    with pytest.raises(LoginError) as raised:
        Pkcs11KeyStore(pin="crypto_user:secret-password")
    assert "secret-password" not in str(raised.value)


def test_forked_child_signs_and_parent_keeps_working(softhsm_store: Pkcs11KeyStore) -> None:
    info = softhsm_store.generate(KeySpec.EC_P256, Binding("fork", ACCOUNT))
    softhsm_store.sign(info.kid, b"before fork", "ES256")
    pid = os.fork()
    if pid == 0:  # child: must re-initialise the module, never touch the parent's sessions
        code = 1
        try:
            signature = softhsm_store.sign(info.kid, b"in child", "ES256", verify=True)
            code = 0 if len(signature) == 64 else 2
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(softhsm_store.sign(info.kid, b"parent after fork", "ES256", verify=True)) == 64


def test_errors_from_the_store_are_all_in_our_tree(softhsm_store: Pkcs11KeyStore) -> None:
    with pytest.raises(HsmKeysError):
        softhsm_store.sign("A" * 43, b"x", "ES256")


def _plant_public_key(
    store: Pkcs11KeyStore, label: str, object_id: bytes, params: bytes, point: bytes
) -> Any:
    """A public-key object made by "another tool" on the same token."""
    with store.pool.borrow() as pooled:
        return pooled.session.create_object(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: KeyType.EC_EDWARDS
                if params.endswith(b"edwards25519") or params == bytes.fromhex("06032b6570")
                else KeyType.EC,
                Attribute.TOKEN: True,
                Attribute.LABEL: label,
                Attribute.ID: object_id,
                Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: point,
            }
        )


def test_keys_written_by_other_tools_in_any_encoding_are_read(softhsm_store: Pkcs11KeyStore) -> None:
    # Ed25519 named by the PrintableString "edwards25519", its point as an OCTET STRING: the
    # forms PKCS#11 3.0 allows, read by the same strict parser as every other token encoding.
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    label = make_label(Binding("planted-ed", ACCOUNT), KeySpec.ED25519, dt.datetime.now(dt.UTC))
    planted = _plant_public_key(
        softhsm_store, label, jwk_thumbprint_bytes(public), b"\x13\x0cedwards25519", b"\x04\x20" + raw
    )
    try:
        found = softhsm_store.find(Binding("planted-ed", ACCOUNT))
        assert found is not None and found.kid == jwk_thumbprint(public)
    finally:
        planted.destroy()


def test_unreadable_or_mislabelled_objects_under_our_prefix_are_skipped(
    softhsm_store: Pkcs11KeyStore,
) -> None:
    real = softhsm_store.generate(KeySpec.EC_P256, Binding("real-one", ACCOUNT))
    p256 = bytes.fromhex("06082a8648ce3d030107")
    good_point = real.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    now = dt.datetime.now(dt.UTC)
    planted = [
        # a point that is not on the curve its label and params name
        _plant_public_key(
            softhsm_store,
            make_label(Binding("garbage", ACCOUNT), KeySpec.EC_P256, now),
            b"\x01" * 32,
            p256,
            b"\x04\x41\x04" + b"\x01" * 64,
        ),
        # a P-256 key whose label claims P-384
        _plant_public_key(
            softhsm_store,
            make_label(Binding("wrong-spec", ACCOUNT), KeySpec.EC_P384, now),
            jwk_thumbprint_bytes(real.public_key),
            p256,
            b"\x04\x41" + good_point,
        ),
        # the real key's point under an ID that is not its thumbprint: the kid would name
        # whichever private key holds that ID
        _plant_public_key(
            softhsm_store,
            make_label(Binding("other-id", ACCOUNT), KeySpec.EC_P256, now),
            b"\x02" * 32,
            p256,
            b"\x04\x41" + good_point,
        ),
    ]
    try:
        kids = {(info.binding.staff, info.kid) for info in softhsm_store.list_keys()}
        assert ("real-one", real.kid) in kids
        assert not {staff for staff, _ in kids} & {"garbage", "wrong-spec", "other-id"}
        assert softhsm_store.find(Binding("garbage", ACCOUNT)) is None
    finally:
        for obj in planted:
            obj.destroy()


def test_concurrent_writers_never_leave_two_keys_for_one_binding(
    pkcs11_env: dict[str, str], tmp_path: Path
) -> None:
    # Two processes race to generate for the same role name ("Race<n>" and "race<n>" are one IAM
    # role); the in-process lock cannot see across them, so the store's re-check after writing must.
    script = tmp_path / "race.py"
    script.write_text(
        textwrap.dedent(
            """
        import multiprocessing as mp
        from hsm_keys.errors import KeyExistsError
        from hsm_keys.keystore.pkcs11 import Pkcs11KeyStore
        from hsm_keys.types import Binding, KeySpec

        ACCOUNT = "%s"

        def writer(staff, barrier, out):
            with Pkcs11KeyStore() as store:
                barrier.wait(60)
                try:
                    out.put(("ok", store.generate(KeySpec.EC_P256, Binding(staff, ACCOUNT)).kid))
                except KeyExistsError:
                    out.put(("yielded", None))

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            outcomes = []
            for n in range(8):
                barrier, out = ctx.Barrier(2), ctx.Queue()
                procs = [
                    ctx.Process(target=writer, args=(s, barrier, out), daemon=True)
                    for s in (f"Race{n}", f"race{n}")
                ]
                for p in procs: p.start()
                for p in procs: p.join(120)
                assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
                results = [out.get(timeout=5) for _ in procs]
                with Pkcs11KeyStore() as store:
                    binding = Binding(f"race{n}", ACCOUNT)
                    standing = [k for k in store.list_keys() if k.binding.same_as(binding)]
                    assert len(standing) <= 1, standing
                    winners = [kid for kind, kid in results if kind == "ok"]
                    assert [k.kid for k in standing] == winners, (standing, results)
                    for k in standing:
                        store.destroy(k.kid)
                outcomes.append(len(winners))
            print(" ".join(map(str, outcomes)))
        """
        )
        % "309876543210"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    winners = [int(x) for x in result.stdout.split()]
    assert len(winners) == 8 and all(w <= 1 for w in winners)


def test_the_sign_fast_path_keeps_every_check(
    softhsm_store: Pkcs11KeyStore, pkcs11_env: dict[str, str]
) -> None:
    # After one checked signature a (kid, alg) pair skips the checks: everything they would catch
    # must still be caught, by the fast path itself or by falling back to the checked one.
    info = softhsm_store.generate(KeySpec.EC_P256, Binding("fast-path", ACCOUNT))
    for alg in ("ES256", SignatureAlgorithm.ES256, "es256"):
        for _ in range(2):
            signature = softhsm_store.sign(info.kid, b"m", alg)
            info.public_key.verify(
                encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                ),
                b"m",
                ec.ECDSA(hashes.SHA256()),
            )
    assert softhsm_store.sign(info.kid, bytearray(b"m"), "ES256")  # other bytes-likes still work
    with pytest.raises(InvalidInputError):
        softhsm_store.sign(info.kid, "text", "ES256")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedAlgorithmError):
        softhsm_store.sign(info.kid, b"m", "ES384")
    # Destroyed by another store: the cached handle fails and the key is reported gone.
    with Pkcs11KeyStore() as other:
        other.destroy(info.kid)
    with pytest.raises(KeyNotFoundError):
        softhsm_store.sign(info.kid, b"m", "ES256")
    with pytest.raises(KeyNotFoundError):
        softhsm_store.sign(info.kid, b"m", "ES256")
    # Destroyed by this store, and a closed store.
    again = softhsm_store.generate(KeySpec.EC_P256, Binding("fast-path-2", ACCOUNT))
    softhsm_store.sign(again.kid, b"m", "ES256")
    softhsm_store.destroy(again.kid)
    with pytest.raises(KeyNotFoundError):
        softhsm_store.sign(again.kid, b"m", "ES256")
    third = softhsm_store.generate(KeySpec.EC_P256, Binding("fast-path-3", ACCOUNT))
    store = Pkcs11KeyStore()
    store.sign(third.kid, b"m", "ES256")
    store.close()
    with pytest.raises(HsmKeysError):
        store.sign(third.kid, b"m", "ES256")
