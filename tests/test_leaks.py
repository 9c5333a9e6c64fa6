"""Nothing secret leaves the bot: connection strings, query literals, mrkdwn controls."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import assume, example, given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bot.gateway import MASK, UNPARSEABLE, describe_target, mask_dsn

# Passwords with everything that breaks hand-written parsers: spaces, quotes, backslashes,
# and the URL delimiters (@ :// ? & = / #), plus non-ASCII.
secrets_ = st.text(
    alphabet=st.sampled_from(list(" '\\@:/?&=#%\"+;$") + list("abcXYZ019") + ["é", "密"]),
    min_size=1,
    max_size=24,
)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
hosts = st.sampled_from(["db.example.org", "127.0.0.1", "h1,h2", "[::1]"])


def url_userinfo(user: str, password: str, host: str, db: str) -> str:
    return f"postgresql://{quote(user)}:{quote(password, safe='')}@{host}:6543/{db}?sslmode=require"


def url_query(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgresql://{quote(user)}@{host}/{db}?password={pw}&application_name=x"


def url_sslpassword(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgres://{user}@{host}/{db}?sslmode=verify-full&sslpassword={pw}"


def url_both(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgresql://{user}:{pw}@{host}/{db}?password={pw}"


def keywords(user: str, password: str, host: str, db: str) -> str:
    return make_conninfo("", host=host.strip("[]"), user=user, password=password, dbname=db)


def keywords_ssl(user: str, password: str, host: str, db: str) -> str:
    return make_conninfo("", host=host.strip("[]"), dbname=db, sslpassword=password)


def nested(user: str, password: str, host: str, db: str) -> str:
    """libpq expands a dbname that is itself a connection string."""
    return make_conninfo("", dbname=url_userinfo(user, password, host, db))


FORMS = [url_userinfo, url_query, url_sslpassword, url_both, keywords, keywords_ssl, nested]


@given(form=st.sampled_from(FORMS), user=words, password=secrets_, host=hosts, db=words)
@example(form=url_userinfo, user="leaps", password="Pw://", host="db.example.org", db="x")
@example(form=url_query, user="u", password="a&password=b", host="h1,h2", db="d")
@example(form=keywords, user="u", password="it's a \\ secret", host="h", db="d")
def test_mask_dsn_never_shows_a_password_in_any_form(
    form: object, user: str, password: str, host: str, db: str
) -> None:
    assert callable(form)
    dsn = form(user, password, host, db)
    reference = mask_dsn(form(user, "REFERENCE", host, db))
    # A password that is also part of the user or host name is not a secret of the mask's.
    assume(password not in reference and quote(password, safe="") not in reference)
    masked = mask_dsn(dsn)
    assert masked == reference != UNPARSEABLE
    assert password not in masked
    assert quote(password, safe="") not in masked and quote(password) not in masked
    assert MASK in masked
    # The form survives: a URL stays a URL, keywords stay keywords, and it names the same server.
    assert masked.startswith(("postgresql://", "postgres://")) == dsn.startswith("postgres")

    def plain(d: str) -> dict[str, str]:
        secret = (MASK, password, quote(password, safe=""))
        params = {k: str(v) for k, v in conninfo_to_dict(d).items()}
        return {k: v for k, v in params.items() if not any(s in v for s in secret)}

    assert plain(masked) == plain(dsn)
    target = describe_target(dsn)
    assert target == describe_target(form(user, "REFERENCE", host, db)) or password not in target


def test_mask_dsn_query_string_secrets() -> None:
    assert (
        mask_dsn("postgresql://u@h/db?password=hunter2&sslpassword=k3y&application_name=a")
        == "postgresql://u@h/db?password=***&sslpassword=***&application_name=a"
    )
    assert mask_dsn("host=h password=hunter2 sslpassword=k3y") == (
        "password=*** host=h sslpassword=***"
    )


def test_unparseable_dsn_shows_a_placeholder_never_the_string() -> None:
    for bad in ("postgresql://u:hunter2@h/db?x", "host=h password='hunter2", "hunter2 junk"):
        assert mask_dsn(bad) == UNPARSEABLE
        assert describe_target(bad) == UNPARSEABLE
