//! Unit tests of `shards.toml` parsing and validation, through
//! [`Config::parse`] and [`Config::from_urls`]: the rules of `mod.rs`, the
//! expansion of `raw.rs`, the TLS settings of `ssl_mode.rs`, the libpq
//! environment, and the password-free printing of `target.rs` and of every
//! error. Postgres is not needed.

use super::*;

const FILE: &str = "shards.toml";

/// A valid master table followed by `shards`.
fn with_shards(shards: &str) -> String {
    format!("[master]\nurl = \"postgres://postgres@127.0.0.1:5440/shardq\"\n\n{shards}")
}

/// Two valid shards on ports 5441 and 5442.
const TWO: &str = r#"
[[shards]]
name = "shard_1"
port = 5441

[[shards]]
name = "shard_2"
port = 5442
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
    Config::parse(text, Path::new(FILE), env)
}

fn parse(text: &str) -> Result<Config> {
    parse_with(text, &no_env)
}

/// The error message of a config that must be rejected; asserts it names
/// the file and every one of `needles`.
fn rejected(text: &str, needles: &[&str]) -> String {
    rejected_with(text, &no_env, needles)
}

fn rejected_with(text: &str, env: &dyn Fn(&str) -> Option<String>, needles: &[&str]) -> String {
    let err = match parse_with(text, env) {
        Ok(c) => panic!("accepted a config that should be rejected:\n{text}\n=> {c:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains(FILE), "error does not name the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error does not mention {n:?}: {msg}");
    }
    msg
}

#[test]
fn a_valid_config_parses_with_documented_defaults() {
    let c = parse(&with_shards(TWO)).unwrap();
    assert_eq!(c.file, Path::new(FILE));
    assert_eq!(c.shard_names(), ["shard_1", "shard_2"]);
    let s = &c.shards[0];
    assert_eq!(s.weight, 1);
    assert_eq!(s.database.target.host, "127.0.0.1");
    assert_eq!(s.database.target.port, 5441);
    assert_eq!(s.database.target.user, "postgres");
    assert_eq!(s.database.target.dbname, "shardq");
    assert_eq!(s.database.target.password, None);
    assert_eq!(s.database.pool, PoolConfig::default());
    assert!(c.shard("shard_2").is_ok());
    assert!(matches!(c.shard("nope"), Err(Error::UnknownShard { .. })));
}

#[test]
fn unknown_top_level_key_is_rejected() {
    let text = format!("colour = \"blue\"\n{}", with_shards(TWO));
    let msg = rejected(&text, &["unknown field", "colour"]);
    assert!(matches!(parse(&text), Err(Error::ConfigSyntax { .. })), "{msg}");
}

#[test]
fn unknown_key_in_master_is_rejected() {
    let text = format!("[master]\nport = 5440\nhots = \"db\"\n{TWO}");
    rejected(&text, &["unknown field", "hots"]);
}

#[test]
fn unknown_key_in_a_shard_is_rejected() {
    let text = with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\nwieght = 2\n");
    rejected(&text, &["unknown field", "wieght"]);
}

#[test]
fn unknown_key_in_a_pool_is_rejected() {
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { max_conections = 5 }\n"),
        &["unknown field", "max_conections"],
    );
    rejected(
        &format!("[master]\nport = 5440\n[master.pool]\nmax_size = 3\n{TWO}"),
        &["unknown field", "max_size"],
    );
}

#[test]
fn duplicate_shard_names_are_rejected() {
    let text =
        with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_1\"\nport = 5442\n");
    rejected(&text, &["shards[1].name", "duplicate", "shard_1", "shards[0]"]);
}

#[test]
fn a_config_without_shards_is_rejected() {
    rejected("[master]\nport = 5440\n", &["shards", "no shards"]);
    rejected("shards = []\n[master]\nport = 5440\n", &["shards", "no shards"]);
}

#[test]
fn negative_weight_is_rejected_and_zero_accepted() {
    let text = with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_2\"\nport = 5442\nweight = -1\n",
    );
    rejected(&text, &["shards[1].weight", "-1", "negative"]);
    let zero = with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_2\"\nport = 5442\nweight = 0\n",
    );
    let c = parse(&zero).unwrap();
    assert_eq!(c.shards[1].weight, 0);
    assert_eq!(c.shards[0].weight, 1);
}

#[test]
fn a_shard_on_the_master_database_is_rejected() {
    // Same fields.
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5440\n"),
        &["shards[0]", "shard_1", "same database as the master"],
    );
    // localhost vs 127.0.0.1.
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nhost = \"localhost\"\nport = 5440\n"),
        &["shards[0]", "shard_1", "same database as the master"],
    );
    // url vs structured fields.
    rejected(
        "[master]\nhost = \"localhost\"\nport = 5440\ndbname = \"app\"\n\
         [[shards]]\nname = \"shard_1\"\nurl = \"postgres://other@127.0.0.1:5440/app\"\n",
        &["shards[0]", "shard_1", "same database as the master"],
    );
    // A different database on the master's server is fine.
    let c = parse(&with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5440\ndbname = \"s1\"\n",
    ))
    .unwrap();
    assert_eq!(c.shards[0].database.target.dbname, "s1");
}

#[test]
fn two_shards_on_one_database_are_rejected() {
    rejected(
        &with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\n\
             [[shards]]\nname = \"shard_2\"\nurl = \"postgres://localhost:5441/shardq\"\n",
        ),
        &["shards[1]", "shard_2", "same database as shard \"shard_1\""],
    );
}

#[test]
fn env_vars_are_expanded() {
    let env = |name: &str| match name {
        "PGHOST" => Some("db.internal".to_string()),
        "PGPASS" => Some("s3cret".to_string()),
        _ => None,
    };
    let text = with_shards(
        "[[shards]]\nname = \"shard_1\"\nhost = \"${PGHOST}\"\nport = 5441\n\
         password = \"${PGPASS}\"\ndbname = \"app_${PGHOST:-x}\"\n",
    );
    let c = parse_with(&text, &env).unwrap();
    let t = &c.shards[0].database.target;
    assert_eq!(t.host, "db.internal");
    assert_eq!(t.password.as_deref(), Some("s3cret"));
    assert_eq!(t.dbname, "app_db.internal");
}

#[test]
fn env_default_is_used_when_unset() {
    let text = with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\nuser = \"${PGUSER_UNSET:-app}\"\n\
         password = \"${PGPASS_UNSET:-}\"\npool = { acquire_timeout = \"${T:-250ms}\" }\n",
    );
    let c = parse(&text).unwrap();
    let d = &c.shards[0].database;
    assert_eq!(d.target.user, "app");
    assert_eq!(d.target.password, None, "an empty default means no password");
    assert_eq!(d.pool.acquire_timeout, Duration::from_millis(250));
    // A set variable wins over the default.
    let env = |n: &str| (n == "PGUSER_UNSET").then(|| "set".to_string());
    let c = parse_with(&text, &env).unwrap();
    assert_eq!(c.shards[0].database.target.user, "set");
}

#[test]
fn unset_env_var_without_default_is_an_error() {
    let text = with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npassword = \"${SHARD1_PASSWORD}\"\n");
    rejected(&text, &["shards[0].password", "SHARD1_PASSWORD", "not set"]);
}

#[test]
fn the_password_is_never_printed() {
    let env = |n: &str| (n == "PW").then(|| "hunter2-env".to_string());
    let text = "[master]\nurl = \"postgres://app:hunter2-url@127.0.0.1:5440/shardq\"\n\
                [[shards]]\nname = \"shard_1\"\nport = 5441\npassword = \"${PW}\"\n";
    let c = parse_with(text, &env).unwrap();
    let m = &c.master.target;
    let s = &c.shards[0].database.target;
    assert_eq!(m.password.as_deref(), Some("hunter2-url"));
    assert_eq!(s.password.as_deref(), Some("hunter2-env"));
    for shown in [
        m.to_string(),
        format!("{m:?}"),
        s.to_string(),
        format!("{s:?}"),
        format!("{c:?}"),
    ] {
        assert!(!shown.contains("hunter2"), "password printed: {shown}");
    }
    assert_eq!(m.to_string(), "postgres://app@127.0.0.1:5440/shardq");
}

#[test]
fn shard_names_must_be_simple_identifiers() {
    let long = "a".repeat(64);
    for bad in ["Shard-1", "1abc", "a:b", "", "shard 1", "_x", "ünï", long.as_str()] {
        let text = with_shards(&format!("[[shards]]\nname = {}\nport = 5441\n", toml_string(bad)));
        rejected(
            &text,
            &["shards[0].name", "not a simple identifier", &format!("{bad:?}")],
        );
    }
    for good in ["a", "shard_1", "eu_west_2", "a".repeat(63).as_str()] {
        let text = with_shards(&format!("[[shards]]\nname = {}\nport = 5441\n", toml_string(good)));
        assert_eq!(parse(&text).unwrap().shards[0].name, good);
    }
}

#[test]
fn url_parts_are_parsed_and_decoded() {
    let text = "[master]\nurl = \"postgres://u:p%40ss@db.example:6000/app?sslmode=require\"\n\
                [[shards]]\nname = \"shard_1\"\nport = 5441\n";
    let t = parse(text).unwrap().master.target;
    assert_eq!(t.host, "db.example");
    assert_eq!(t.port, 6000);
    assert_eq!(t.user, "u");
    assert_eq!(t.password.as_deref(), Some("p@ss"));
    assert_eq!(t.dbname, "app");
    assert_eq!(t.sslmode, SslMode::Require);
    // postgresql:// is accepted too, and missing parts keep their defaults.
    let t = parse("[master]\nurl = \"postgresql://db.example\"\n[[shards]]\nname = \"s\"\n")
        .unwrap()
        .master
        .target;
    assert_eq!(
        (t.host.as_str(), t.port, t.user.as_str()),
        ("db.example", 5432, "postgres")
    );
    assert_eq!((t.dbname.as_str(), t.password.as_deref()), ("shardq", None));
}

#[test]
fn url_userinfo_keeps_plus_and_ampersand() {
    // `+` and `&` are literal in a URL's userinfo and path (only form
    // encoding gives them a meaning).
    let text = "[master]\nurl = \"postgres://a+b:x+y&z=w@db.example/my+db\"\n\
                [[shards]]\nname = \"shard_1\"\nport = 5441\n";
    let t = parse(text).unwrap().master.target;
    assert_eq!(t.user, "a+b");
    assert_eq!(t.password.as_deref(), Some("x+y&z=w"));
    assert_eq!(t.dbname, "my+db");
}

#[test]
fn structured_fields_override_url_parts() {
    let text = "[master]\nurl = \"postgres://u:pw@db.example:6000/app?sslmode=require\"\n\
                host = \"other.example\"\nport = 7000\nuser = \"v\"\npassword = \"pw2\"\n\
                dbname = \"app2\"\nsslmode = \"disable\"\n\
                [[shards]]\nname = \"shard_1\"\nport = 5441\n";
    let t = parse(text).unwrap().master.target;
    assert_eq!(t.host, "other.example");
    assert_eq!(t.port, 7000);
    assert_eq!(t.user, "v");
    assert_eq!(t.password.as_deref(), Some("pw2"));
    assert_eq!(t.dbname, "app2");
    assert_eq!(t.sslmode, SslMode::Disable);
}

#[test]
fn a_url_with_another_scheme_is_rejected() {
    let msg = rejected(
        "[master]\nurl = \"mysql://u:topsecret@db.example/app\"\n[[shards]]\nname = \"s\"\n",
        &["master.url", "scheme", "mysql://"],
    );
    assert!(!msg.contains("topsecret"), "the URL's password was echoed: {msg}");
}

#[test]
fn a_bad_sslmode_is_rejected() {
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\nsslmode = \"sometimes\"\n"),
        &["shards[0].sslmode", "\"sometimes\"", "verify-full"],
    );
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nurl = \"postgres://h:5441/db?sslmode=bogus\"\n"),
        &["shards[0]", "sslmode", "\"bogus\""],
    );
}

#[test]
fn a_bad_port_is_rejected() {
    for p in ["0", "-5", "65536"] {
        rejected(
            &with_shards(&format!("[[shards]]\nname = \"shard_1\"\nport = {p}\n")),
            &["shards[0].port", p, "not a TCP port"],
        );
    }
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nurl = \"postgres://u:pw@h:99999/db\"\n"),
        &["shards[0].url", "not a valid URL"],
    );
}

#[test]
fn pool_acquire_timeout_is_a_duration() {
    let c = parse(&with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { acquire_timeout = \"5s\", max_connections = 3, min_connections = 1 }\n",
    ))
    .unwrap();
    let pool = &c.shards[0].database.pool;
    assert_eq!(pool.acquire_timeout, Duration::from_secs(5));
    assert_eq!((pool.max_connections, pool.min_connections), (3, 1));
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { acquire_timeout = \"five\" }\n"),
        &["shards[0].pool.acquire_timeout", "\"five\"", "not a duration"],
    );
}

#[test]
fn pool_server_timeouts_default_and_parse() {
    let d = PoolConfig::default();
    assert_eq!(
        (d.acquire_timeout, d.statement_timeout, d.lock_timeout),
        (Duration::from_secs(5), Duration::from_secs(30), Duration::from_secs(10))
    );
    let c = parse(&with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { statement_timeout = \"${ST:-2m}\", lock_timeout = \"1500ms\" }\n\
         [[shards]]\nname = \"shard_2\"\nport = 5442\npool = { statement_timeout = \"0\", lock_timeout = \"0s\" }\n",
    ))
    .unwrap();
    let (one, two) = (&c.shards[0].database.pool, &c.shards[1].database.pool);
    assert_eq!(
        (one.statement_timeout, one.lock_timeout),
        (Duration::from_secs(120), Duration::from_millis(1500))
    );
    assert_eq!(
        (two.statement_timeout, two.lock_timeout),
        (Duration::ZERO, Duration::ZERO)
    );
    assert_eq!(c.master.pool, PoolConfig::default());
}

#[test]
fn bad_pool_timeouts_are_rejected_naming_the_field() {
    let shard = |pool: &str| {
        with_shards(&format!(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = {{ {pool} }}\n"
        ))
    };
    rejected(
        &shard("statement_timeout = \"soon\""),
        &["shards[0].pool.statement_timeout", "\"soon\"", "not a duration"],
    );
    rejected(
        &shard("lock_timeout = \"250us\""),
        &["shards[0].pool.lock_timeout", "not a whole number of milliseconds"],
    );
    rejected(
        &shard("statement_timeout = \"30days\""),
        &["shards[0].pool.statement_timeout", "more than the server accepts"],
    );
    rejected(
        &shard("acquire_timeout = \"0s\""),
        &["shards[0].pool.acquire_timeout", "must be more than 0"],
    );
    rejected(
        &format!("[master]\nport = 5440\n[master.pool]\nconnect_timeout = \"5s\"\n{TWO}"),
        &["master.pool.connect_timeout", "set acquire_timeout instead"],
    );
}

#[test]
fn pool_min_above_max_is_rejected() {
    rejected(
        &with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { max_connections = 2, min_connections = 3 }\n",
        ),
        &["shards[0].pool.min_connections", "3 is more than max_connections (2)"],
    );
    rejected(
        &format!("[master]\nport = 5440\n[master.pool]\nmin_connections = 11\n{TWO}"),
        &["master.pool.min_connections", "more than max_connections (10)"],
    );
}

#[test]
fn the_committed_shards_toml_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shards.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let c = Config::parse(&text, Path::new(path), &no_env).unwrap();
    assert_eq!(c.master.target.host, "127.0.0.1");
    assert_eq!(c.master.target.port, 5440);
    assert_eq!(c.master.target.user, "postgres");
    assert_eq!(c.master.target.password, None);
    assert_eq!(c.shard_names(), ["shard_1", "shard_2", "shard_3"]);
    let ports: Vec<u16> = c.shards.iter().map(|s| s.database.target.port).collect();
    assert_eq!(ports, [5441, 5442, 5443]);
    assert!(c
        .shards
        .iter()
        .all(|s| s.weight == 1 && s.database.pool.max_connections == 20));
    // The password comes from the environment when it is set.
    let env = |n: &str| (n == "SHARDQ_PGPASSWORD").then(|| "pw".to_string());
    let c = Config::parse(&text, Path::new(path), &env).unwrap();
    assert_eq!(c.shards[2].database.target.password.as_deref(), Some("pw"));
}

#[test]
fn from_urls_builds_an_inline_config() {
    let c = Config::from_urls(
        "postgres://postgres@127.0.0.1:5440/m",
        &[
            ("a", "postgres://127.0.0.1:5441/x"),
            ("b", "postgres://127.0.0.1:5442/x"),
        ],
    )
    .unwrap();
    assert_eq!(c.shard_names(), ["a", "b"]);
    let err = Config::from_urls("postgres://127.0.0.1:5440/m", &[("Bad", "postgres://h/x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("<inline>") && err.contains("shards[0].name"), "{err}");
}

/// One shard on port 5441 with `fields` added.
fn one_shard(fields: &str) -> String {
    with_shards(&format!("[[shards]]\nname = \"shard_1\"\nport = 5441\n{fields}"))
}

#[test]
fn sslmode_is_libpq_s_exact_spelling_wherever_it_comes_from() {
    // Upper case used to pass validation (sqlx lower-cases) while the
    // migrator fell back to prefer: now it is refused, naming the field.
    rejected(
        &one_shard("sslmode = \"VERIFY-FULL\"\nsslrootcert = \"ca.pem\"\n"),
        &["shards[0].sslmode", "\"VERIFY-FULL\"", "lower case", "verify-full"],
    );
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\nurl = \"postgres://h:5441/db?sslmode=Require\"\n"),
        &["shards[0].sslmode", "\"Require\" (in url)"],
    );
    let env = |n: &str| (n == "PGSSLMODE").then(|| "Verify-CA".to_string());
    rejected_with(
        &one_shard(""),
        &env,
        &["master.sslmode", "\"Verify-CA\" (from PGSSLMODE)"],
    );
    for mode in ["disable", "allow", "prefer", "require"] {
        let c = parse(&one_shard(&format!("sslmode = \"{mode}\"\n"))).unwrap();
        assert_eq!(c.shards[0].database.target.sslmode.as_str(), mode);
    }
}

#[test]
fn sslrootcert_follows_libpq() {
    let target = |fields: &str| parse(&one_shard(fields)).unwrap().shards[0].database.target.clone();
    // system makes verify-full the default ...
    let t = target("sslrootcert = \"system\"\n");
    assert_eq!(
        (t.sslmode, t.sslrootcert.clone()),
        (SslMode::VerifyFull, Some(SslRootCert::System))
    );
    assert_eq!(t.server_check(), Ok(ServerCheck::ChainAndHost(&SslRootCert::System)));
    // ... and goes with nothing weaker.
    for weaker in ["disable", "prefer", "require", "verify-ca"] {
        rejected(
            &one_shard(&format!("sslmode = \"{weaker}\"\nsslrootcert = \"system\"\n")),
            &["shards[0].sslmode", "sslrootcert=system", "verify-full", weaker],
        );
    }
    // A file is the only root trusted; require with one verifies the chain.
    let ca = SslRootCert::File("ca.pem".into());
    assert_eq!(
        target("sslmode = \"require\"\nsslrootcert = \"ca.pem\"\n").server_check(),
        Ok(ServerCheck::Chain(&ca))
    );
    assert_eq!(
        target("sslmode = \"verify-ca\"\nsslrootcert = \"ca.pem\"\n").server_check(),
        Ok(ServerCheck::Chain(&ca))
    );
    assert_eq!(
        target("sslmode = \"require\"\n").server_check(),
        Ok(ServerCheck::Unverified)
    );
    // Verifying without a root is an error, not the web roots.
    for mode in ["verify-ca", "verify-full"] {
        rejected(
            &one_shard(&format!("sslmode = \"{mode}\"\n")),
            &["shards[0].sslrootcert", "needs sslrootcert", mode],
        );
    }
    // URL parameters mean the same.
    let t = parse(&with_shards(
        "[[shards]]\nname = \"shard_1\"\nurl = \"postgres://h:5441/db?sslrootcert=system&sslcert=c.pem&sslkey=k.pem\"\n",
    ))
    .unwrap()
    .shards[0]
        .database
        .target
        .clone();
    assert_eq!(t.sslmode, SslMode::VerifyFull);
    assert_eq!(t.client_cert(), Some((Path::new("c.pem"), Path::new("k.pem"))));
}

#[test]
fn a_client_certificate_needs_its_key_and_the_key_its_certificate() {
    rejected(&one_shard("sslcert = \"c.pem\"\n"), &["shards[0].sslkey", "set both"]);
    rejected(&one_shard("sslkey = \"k.pem\"\n"), &["shards[0].sslcert", "set both"]);
    let c = parse(&one_shard("sslcert = \"c.pem\"\nsslkey = \"k.pem\"\n")).unwrap();
    let t = &c.shards[0].database.target;
    assert_eq!(t.client_cert(), Some((Path::new("c.pem"), Path::new("k.pem"))));
    assert!(t.relayed(), "sqlx must present it through the relay");
    assert!(
        !c.master.target.relayed(),
        "prefer without certificates stays with sqlx's own TLS"
    );
}

#[test]
fn the_libpq_environment_fills_in_what_a_database_leaves_unset() {
    let env = |n: &str| {
        Some(
            match n {
                "PGPASSWORD" => "env-pw",
                "PGSSLMODE" => "verify-ca",
                "PGSSLROOTCERT" => "/env/ca.pem",
                "PGSSLCERT" => "/env/client.crt",
                "PGSSLKEY" => "/env/client.key",
                "PGOPTIONS" => "-c search_path=app",
                "PGHOST" | "PGPORT" | "PGUSER" | "PGDATABASE" => "ignored",
                _ => return None,
            }
            .to_string(),
        )
    };
    let text = "[master]\nport = 5440\n\
                [[shards]]\nname = \"shard_1\"\nport = 5441\npassword = \"file-pw\"\nsslmode = \"verify-full\"\n\
                sslrootcert = \"/file/ca.pem\"\nsslcert = \"/file/c.crt\"\nsslkey = \"/file/c.key\"\n\
                [[shards]]\nname = \"shard_2\"\nurl = \"postgres://u:url-pw@h:5442/db?sslmode=require\"\n";
    let c = parse_with(text, &env).unwrap();
    let m = &c.master.target;
    assert_eq!(m.password.as_deref(), Some("env-pw"));
    assert_eq!(m.sslmode, SslMode::VerifyCa);
    assert_eq!(m.sslrootcert, Some(SslRootCert::File("/env/ca.pem".into())));
    assert_eq!(
        m.client_cert(),
        Some((Path::new("/env/client.crt"), Path::new("/env/client.key")))
    );
    assert_eq!(m.options.as_deref(), Some("-c search_path=app"));
    // Not read: each database has its own address.
    assert_eq!(
        (m.host.as_str(), m.port, m.user.as_str(), m.dbname.as_str()),
        ("127.0.0.1", 5440, "postgres", "shardq")
    );
    // What the file says wins.
    let s1 = &c.shards[0].database.target;
    assert_eq!(s1.password.as_deref(), Some("file-pw"));
    assert_eq!(s1.sslmode, SslMode::VerifyFull);
    assert_eq!(s1.sslrootcert, Some(SslRootCert::File("/file/ca.pem".into())));
    assert_eq!(
        s1.client_cert(),
        Some((Path::new("/file/c.crt"), Path::new("/file/c.key")))
    );
    let s2 = &c.shards[1].database.target;
    assert_eq!((s2.password.as_deref(), s2.sslmode), (Some("url-pw"), SslMode::Require));
    // The options reach both drivers.
    let tp = m.tokio_postgres_config();
    assert_eq!(tp.get_options(), Some("-c search_path=app"));
    assert_eq!(tp.get_password(), Some(&b"env-pw"[..]));
    // Empty counts as unset.
    let empty = |n: &str| n.starts_with("PG").then(String::new);
    let c = parse_with(&one_shard(""), &empty).unwrap();
    assert_eq!(
        (c.master.target.password.as_deref(), c.master.target.sslmode),
        (None, SslMode::Prefer)
    );
}

#[test]
fn toml_errors_never_show_a_value_of_the_file() {
    let secret = "s3cret-Hunter2";
    let cases = [
        // A misspelt key: toml's own text quoted the whole line.
        (
            format!("pasword = \"{secret}\"\n"),
            vec!["unknown field", "pasword", "line 4"],
        ),
        // A wrong type: serde's message quoted the value.
        (
            "password = 123456789\n".to_string(),
            vec!["invalid type: integer, expected a string", "line "],
        ),
        (
            format!("weight = \"{secret}\"\n"),
            vec!["invalid type: string, expected i64"],
        ),
        // A bad escape, an unterminated string, trailing junk.
        (
            format!("password = \"{secret}\\q\"\n"),
            vec!["invalid escape sequence", "line 7, column "],
        ),
        (format!("password = \"{secret}\n"), vec!["invalid basic string"]),
        (format!("password = \"{secret}\" {secret}\n"), vec!["expected newline"]),
        (format!("password = {secret}\n"), vec!["invalid string"]),
        (format!("password = [\"{secret}\"]\n"), vec!["invalid type: sequence"]),
    ];
    for (line, needles) in cases {
        let text = with_shards(&format!("[[shards]]\nname = \"shard_1\"\nport = 5441\n{line}"));
        let err = parse(&text).unwrap_err();
        let (shown, debug) = (err.to_string(), format!("{err:?}"));
        assert!(matches!(err, Error::ConfigSyntax { .. }), "{shown}");
        for n in needles.iter().chain(&[FILE]) {
            assert!(shown.contains(n), "{line:?}: error does not mention {n:?}: {shown}");
        }
        for s in [&shown, &debug] {
            assert!(
                !s.contains(secret) && !s.contains("123456789"),
                "{line:?}: secret shown: {s}"
            );
        }
    }
}

#[test]
fn expansion_errors_never_echo_the_value() {
    let secret = "pa55-Hunter2";
    for (value, needles) in [
        (
            format!("{secret}${{oops"),
            vec!["unterminated `${`", "character 13", "$${"],
        ),
        (
            format!("{secret}${{not a name}}"),
            vec!["not a variable reference", "character 13"],
        ),
        (
            format!("${{}}{secret}"),
            vec!["not a variable reference", "character 1"],
        ),
    ] {
        let err = rejected(
            &one_shard(&format!("password = {}\n", toml_string(&value))),
            &["shards[0].password"],
        );
        assert!(!err.contains(secret), "{err}");
        for n in needles {
            assert!(err.contains(n), "error does not mention {n:?}: {err}");
        }
    }
    // Also inside a url.
    let err = rejected(
        &with_shards(&format!(
            "[[shards]]\nname = \"shard_1\"\nurl = \"postgres://u:{secret}${{x@h/db\"\n"
        )),
        &["shards[0].url", "unterminated"],
    );
    assert!(!err.contains(secret), "{err}");
}

#[test]
fn a_literal_dollar_brace_is_written_twice() {
    let env = |n: &str| (n == "X").then(|| "x".to_string());
    let c = parse_with(&one_shard("password = \"a$${X}b$c$$d${X}\"\n"), &env).unwrap();
    assert_eq!(c.shards[0].database.target.password.as_deref(), Some("a${X}b$c$$dx"));
}

#[test]
fn values_put_into_a_url_cannot_change_its_host_port_or_database() {
    let nasty = "p/w@evil.example:1/other?sslmode=disable#";
    let env = |n: &str| match n {
        "PW" => Some(nasty.to_string()),
        "HOST" => Some("db.internal".to_string()),
        "USER" => Some("a@b".to_string()),
        "URL" => Some("postgres://whole:pw@whole.example:6000/w?sslmode=require".to_string()),
        _ => None,
    };
    let text = "[master]\nurl = \"postgres://${USER}:${PW}@${HOST}:5440/app?sslmode=verify-full&sslrootcert=${CA:-/ca dir/ca.pem}\"\n\
                [[shards]]\nname = \"shard_1\"\nurl = \"${URL}\"\n";
    let c = parse_with(text, &env).unwrap();
    let m = &c.master.target;
    assert_eq!(
        (m.host.as_str(), m.port, m.dbname.as_str()),
        ("db.internal", 5440, "app")
    );
    assert_eq!((m.user.as_str(), m.password.as_deref()), ("a@b", Some(nasty)));
    assert_eq!(m.sslmode, SslMode::VerifyFull);
    assert_eq!(m.sslrootcert, Some(SslRootCert::File("/ca dir/ca.pem".into())));
    // A reference that is the whole url is a whole URL.
    let s = &c.shards[0].database.target;
    assert_eq!(
        (s.host.as_str(), s.port, s.dbname.as_str(), s.sslmode),
        ("whole.example", 6000, "w", SslMode::Require)
    );
}

#[test]
fn connect_options_of_a_verifying_target_go_through_the_relay() {
    let c = parse(&with_shards(
        "[[shards]]\nname = \"shard_1\"\nport = 5441\nsslmode = \"verify-full\"\nsslrootcert = \"/x/ca.pem\"\n",
    ))
    .unwrap();
    let t = &c.shards[0].database.target;
    assert!(t.relayed());
    let o = t.connect_options();
    assert_eq!(o.get_host(), "127.0.0.1");
    assert_eq!(o.get_port(), 5441);
    let socket = o.get_socket().expect("a relay socket");
    assert!(socket.join(".s.PGSQL.5441").exists(), "{}", socket.display());
    // The same settings share a relay; user, password and dbname do not matter.
    let mut other = t.clone();
    other.dbname = "another".into();
    other.password = Some("pw".into());
    assert_eq!(other.connect_options().get_socket(), Some(socket));
    assert!(!c.master.target.relayed());
    assert_eq!(c.master.target.connect_options().get_socket(), None);
}

#[test]
fn account_tables_are_declared_with_a_default_column_and_checked() {
    let base = "[master]\nurl = \"postgres://h/m\"\n[[shards]]\nname = \"s1\"\nurl = \"postgres://h/s1\"\n";
    let env = |_: &str| None;
    let ok = format!(
        "{base}[accounts]\ntables = [{{ table = \"documents\" }}, {{ table = \"app.users\", column = \"tenant\" }}]\n"
    );
    let c = Config::parse(&ok, Path::new("shards.toml"), &env).unwrap();
    assert_eq!(
        c.account_tables,
        vec![
            AccountTable {
                table: "documents".into(),
                column: "account".into()
            },
            AccountTable {
                table: "app.users".into(),
                column: "tenant".into()
            },
        ]
    );
    for (bad, field) in [
        ("[{ table = \"a;drop\" }]", "accounts.tables[0].table"),
        ("[{ table = \"t\", column = \"x y\" }]", "accounts.tables[0].column"),
        ("[{ table = \"t\" }, { table = \"t\" }]", "accounts.tables[1].table"),
    ] {
        let text = format!("{base}[accounts]\ntables = {bad}\n");
        let err = Config::parse(&text, Path::new("shards.toml"), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shards.toml") && err.contains(field), "{err}");
    }
}

#[test]
fn the_placement_strategy_defaults_to_ring_and_a_bad_one_names_the_field() {
    assert_eq!(parse(&with_shards(TWO)).unwrap().placement, PlacementStrategy::Ring);
    for (written, expected) in [
        ("ring", PlacementStrategy::Ring),
        ("least_loaded", PlacementStrategy::LeastLoaded),
    ] {
        let text = format!("{}[placement]\nstrategy = \"{written}\"\n", with_shards(TWO));
        assert_eq!(parse(&text).unwrap().placement, expected, "{written}");
        assert_eq!(expected.as_str(), written);
    }
    let bad = format!("{}[placement]\nstrategy = \"emptiest\"\n", with_shards(TWO));
    rejected(&bad, &["placement.strategy", "emptiest", "least_loaded"]);
    let unknown = format!("{}[placement]\nstratgy = \"ring\"\n", with_shards(TWO));
    rejected(&unknown, &["stratgy"]);
}

#[test]
fn pooler_and_listen_url_are_read_and_listen_url_takes_the_rest_from_the_database() {
    let c = parse(&with_shards(
        r#"
[[shards]]
name = "shard_1"
url = "postgres://app:s3cret@10.0.0.11:6432/jobs"
pooler = "transaction"
listen_url = "postgres://10.0.0.11:5432"

[[shards]]
name = "shard_2"
port = 5442
"#,
    ))
    .unwrap();
    let pooled = &c.shards[0].database;
    assert_eq!(pooled.pooler, Pooler::Transaction);
    let direct = pooled.listen.as_ref().unwrap();
    assert_eq!((direct.host.as_str(), direct.port), ("10.0.0.11", 5432));
    assert_eq!(
        (direct.user.as_str(), direct.password.as_deref(), direct.dbname.as_str()),
        ("app", Some("s3cret"), "jobs")
    );
    assert_eq!(c.shards[1].database.pooler, Pooler::None);
    assert!(c.shards[1].database.listen.is_none());
    assert_eq!(c.master.pooler, Pooler::None);
}

#[test]
fn an_unknown_pooler_is_rejected_naming_the_field() {
    rejected(
        &with_shards("[[shards]]\nname = \"shard_1\"\npooler = \"statement\"\n"),
        &["shards[0].pooler", "\"statement\"", "none, transaction"],
    );
}
