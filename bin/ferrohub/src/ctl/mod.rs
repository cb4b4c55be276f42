//! `ferrohub ctl`: the operator command line. Every command is one or a few calls of the hub's
//! HTTP API (`/api/v1`, see `docs/http-api.md`); `docs/ctl.md` documents the commands.
//!
//! Conventions: results go to stdout (a table, or the API's JSON with `--output json`), notes and
//! progress to stderr; a secret shown once (a new API token, a device password, a device JWT) is
//! printed alone on stdout so that `$(ferrohub ctl ...)` captures it. Errors print the API's
//! message and a hint, and exit with status 1.

mod alarms;
mod client;
mod commands;
mod device_commands;
mod export;
mod import;
mod output;
mod rules;
mod telemetry;
mod twins;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

pub(crate) use client::{Client, Failure};
pub(crate) use output::Output;

const CTL_EXAMPLES: &str = "\
Examples:
  export FERROHUB_URL=http://hub.example.com:8080 FERROHUB_TOKEN=fh_... FERROHUB_TENANT=acme
  ferrohub ctl devices list --tag site=plant-a --status enabled
  ferrohub ctl devices import fleet.csv
  ferrohub ctl credentials issue-cert boiler-17 --out-dir ./certs
  ferrohub ctl audit --action device. --since 1h
  ferrohub ctl twins set-desired boiler-17 '{\"rate\": 30}'
  ferrohub ctl commands send boiler-17 reboot --payload '{\"delay\": 5}'
  ferrohub ctl telemetry agg boiler-17 temp --bucket 1h --from 7d

Exit status: 0 on success; 1 when the command failed (the message and a hint are on stderr) or an
import rejected rows; 2 for a command-line usage error.";

/// Operates a running hub over its HTTP API: tenants, devices, credentials, groups, policies,
/// API tokens, the audit log, device twins, commands to devices and telemetry.
#[derive(Args, Debug)]
#[command(after_help = CTL_EXAMPLES)]
pub struct CtlArgs {
    /// The hub's HTTP address (its `--http-listen`); `/api/v1` is appended.
    #[arg(
        long,
        global = true,
        help_heading = "Connection and output",
        env = "FERROHUB_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    url: String,
    /// API token (`fh_...`). Prefer the environment variable: arguments show in process lists.
    #[arg(
        long,
        global = true,
        help_heading = "Connection and output",
        env = "FERROHUB_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Tenant the command works in.
    #[arg(
        long,
        global = true,
        help_heading = "Connection and output",
        env = "FERROHUB_TENANT",
        default_value = "default",
        value_name = "TENANT"
    )]
    tenant: String,
    /// Output format: a table for people, or the API's JSON for scripts.
    #[arg(
        long,
        short = 'o',
        global = true,
        help_heading = "Connection and output",
        value_enum,
        default_value_t = Output::Table
    )]
    output: Output,
    /// PEM file of CA certificates to trust for an https:// hub with a self-signed or private
    /// certificate (in addition to the public web roots).
    #[arg(
        long,
        global = true,
        help_heading = "Connection and output",
        env = "FERROHUB_CA_FILE",
        value_name = "FILE"
    )]
    ca_file: Option<PathBuf>,
    /// Seconds to wait for each answer of the hub [default: 120]. For a direct `commands send`:
    /// seconds the device has to answer [default: 30, at most 300].
    #[arg(
        long,
        global = true,
        help_heading = "Connection and output",
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    timeout: Option<u64>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Tenants: isolated namespaces of devices, topics and data.
    #[command(subcommand)]
    Tenants(TenantsCmd),
    /// Devices of the tenant: list, show, create, enable/disable, tag, decommission, bulk import.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Device credentials: passwords, certificates, device tokens.
    #[command(subcommand)]
    Credentials(CredentialsCmd),
    /// Static and dynamic device groups.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// Named authorization policies.
    #[command(subcommand)]
    Policies(PoliciesCmd),
    /// Operator API tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The audit log, newest first.
    #[command(
        after_help = "Examples:\n  ferrohub ctl audit --action device. --since 1h\n  \
        ferrohub ctl audit --since 2026-01-31T08:00:00Z --result failure --limit 500"
    )]
    Audit(AuditArgs),
    /// Device twins: read, change desired state and tags, history, fleet queries and counts.
    #[command(subcommand)]
    Twins(twins::TwinsCmd),
    /// Commands to devices: send (direct or queued), list, show and cancel queued ones.
    #[command(subcommand)]
    Commands(device_commands::CommandsCmd),
    /// Telemetry: a device's series, raw points, aggregates, fleet snapshots and aggregates,
    /// writes, exports to Parquet/CSV, and the tenant's telemetry settings.
    #[command(subcommand)]
    Telemetry(Box<telemetry::TelemetryCmd>),
    /// Rules running in the hub: list, show, create, update, enable/disable, delete, dry runs,
    /// stats and dead letters.
    #[command(subcommand)]
    Rules(rules::RulesCmd),
    /// Alarms: list, show, raise, acknowledge, clear, history, counts, and their notification
    /// channels (webhooks) with test sends and deliveries.
    #[command(subcommand)]
    Alarms(alarms::AlarmsCmd),
}

// ---- tenants -------------------------------------------------------------------------------

#[derive(Subcommand, Debug)]
enum TenantsCmd {
    /// Lists the tenants in the token's scope.
    #[command(after_help = "Example:\n  ferrohub ctl tenants list")]
    List,
    /// Creates a tenant (platform-wide admin token).
    #[command(after_help = "Example:\n  ferrohub ctl tenants create acme --name \"ACME Corp\"")]
    Create {
        /// Tenant id: 1-128 characters of A-Z a-z 0-9 . _ : - (not . or ..)
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
    },
    /// Shows a tenant and its settings.
    #[command(after_help = "Example:\n  ferrohub ctl tenants show acme")]
    Show {
        /// Tenant id.
        id: String,
    },
    /// Deletes a tenant with its devices, credentials and tokens (platform-wide admin token).
    #[command(after_help = "Example:\n  ferrohub ctl tenants delete acme")]
    Delete {
        /// Tenant id.
        id: String,
    },
}

// ---- devices -------------------------------------------------------------------------------

/// Device status.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// May connect.
    Enabled,
    /// Refused on connect.
    Disabled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Enabled => "enabled",
            Status::Disabled => "disabled",
        }
    }
}

/// Sort key of a device listing.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    /// By id.
    Id,
    /// By name, then id.
    Name,
    /// By creation time.
    #[value(alias = "created_at")]
    CreatedAt,
    /// By last activity (never-seen devices first).
    #[value(alias = "last_seen")]
    LastSeen,
}

impl SortKey {
    fn as_str(self) -> &'static str {
        match self {
            SortKey::Id => "id",
            SortKey::Name => "name",
            SortKey::CreatedAt => "created_at",
            SortKey::LastSeen => "last_seen",
        }
    }
}

/// Filters shared by device listings and dynamic groups.
#[derive(Args, Debug, Default)]
struct DeviceFilter {
    /// Only devices with this tag; repeat it for several (all must match).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_kv)]
    tags: Vec<(String, String)>,
    /// Only devices of this type.
    #[arg(long = "type", value_name = "TYPE")]
    device_type: Option<String>,
    /// Only enabled or only disabled devices.
    #[arg(long, value_enum)]
    status: Option<Status>,
    /// Only devices whose name starts with this.
    #[arg(long, value_name = "PREFIX")]
    name_prefix: Option<String>,
    /// Only devices connected now.
    #[arg(long, conflicts_with = "offline")]
    online: bool,
    /// Only devices not connected now.
    #[arg(long)]
    offline: bool,
}

impl DeviceFilter {
    fn online(&self) -> Option<bool> {
        match (self.online, self.offline) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Args, Debug)]
struct DevicesList {
    #[command(flatten)]
    filter: DeviceFilter,
    /// Only members of this static or dynamic group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Sort key.
    #[arg(long, value_enum, default_value_t = SortKey::Id)]
    sort: SortKey,
    /// Sort in descending order.
    #[arg(long)]
    desc: bool,
    /// Page size, 1 to 1000 (default 100; 1000 with --all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Fetch every page (follows the cursors).
    #[arg(long)]
    all: bool,
    /// Start at this page (the `next_cursor` of the previous one).
    #[arg(long, conflicts_with = "all", value_name = "CURSOR")]
    cursor: Option<String>,
}

/// Format of an import file.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ImportFormat {
    /// CSV with a header line naming columns from id,name,type,tags,status,policy,groups.
    Csv,
    /// A JSON array of device specifications.
    Json,
}

#[derive(Subcommand, Debug)]
enum DevicesCmd {
    /// Lists devices: filtered, sorted, one page or --all.
    #[command(
        after_help = "Examples:\n  ferrohub ctl devices list --tag site=plant-a --tag floor=2 --status enabled\n  \
        ferrohub ctl devices list --online --sort last-seen --desc --limit 20\n  \
        ferrohub ctl devices list --group wave-1 --all --output json | jq '.items[].id'"
    )]
    List(DevicesList),
    /// Shows a device with its connectivity, tags, groups and attributes.
    #[command(after_help = "Example:\n  ferrohub ctl devices show boiler-17")]
    Show {
        /// Device id.
        id: String,
    },
    /// Shows a device's connectivity now and its history of connects and disconnects, with why
    /// each connection ended, newest first.
    #[command(
        after_help = "Examples:\n  ferrohub ctl devices connectivity boiler-17\n  \
        ferrohub ctl devices connectivity boiler-17 --limit 20 --before 8812"
    )]
    Connectivity {
        /// Device id.
        id: String,
        /// Number of events, 1 to 1000.
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Events older than this sequence number (the next page).
        #[arg(long, value_name = "SEQ")]
        before: Option<i64>,
    },
    /// Registers a device.
    #[command(
        after_help = "Example:\n  ferrohub ctl devices create boiler-17 --name \"Boiler 17\" --type thermostat \\\n      \
        --tag site=plant-a --tag floor=2 --group wave-1"
    )]
    Create {
        /// Device id: 1-128 characters of A-Z a-z 0-9 . _ : - (not . or ..)
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Device type (its tags, attributes and policy are the defaults).
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        /// A tag; repeat for several.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_kv)]
        tags: Vec<(String, String)>,
        /// A static group to join; repeat for several.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Named policy.
        #[arg(long)]
        policy: Option<String>,
        /// Free attributes, a JSON object: '{"serial": "X17"}'.
        #[arg(long, value_name = "JSON")]
        attributes: Option<String>,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Enables a device: it may connect again.
    #[command(after_help = "Example:\n  ferrohub ctl devices enable boiler-17")]
    Enable {
        /// Device id.
        id: String,
    },
    /// Disables a device: it is refused on connect and its connections are closed at once.
    #[command(after_help = "Example:\n  ferrohub ctl devices disable boiler-17")]
    Disable {
        /// Device id.
        id: String,
    },
    /// Decommissions a device: its record, credentials and memberships are deleted and its
    /// connections closed; its telemetry is kept or purged by the tenant's setting.
    #[command(after_help = "Example:\n  ferrohub ctl devices delete boiler-17")]
    Delete {
        /// Device id.
        id: String,
    },
    /// Sets and removes tags of a device (other tags are unchanged).
    #[command(
        after_help = "Example:\n  ferrohub ctl devices tag boiler-17 zone=b floor=3 --remove legacy"
    )]
    Tag {
        /// Device id.
        id: String,
        /// Tags to set.
        #[arg(value_name = "KEY=VALUE", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        /// A tag to remove; repeat for several.
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Registers many devices from a CSV or JSON file, in chunks, with a progress bar; prints
    /// what was imported and the rejected rows (numbered as in the file), and exits with status 1
    /// if any row was rejected.
    #[command(
        after_help = "CSV: a header line naming columns from id,name,type,tags,status,policy,groups \
        (only id is required);\ntags as k=v;k2=v2, groups as g1;g2. JSON: an array of device objects as \
        `devices create` sends them.\n\nExamples:\n  ferrohub ctl devices import fleet.csv\n  \
        generate-devices | ferrohub ctl devices import - --format json"
    )]
    Import {
        /// The file (`.csv` or `.json`), or `-` for standard input (with --format).
        file: PathBuf,
        /// The format (default: from the file's extension).
        #[arg(long, value_enum)]
        format: Option<ImportFormat>,
        /// Rows per request.
        #[arg(long, default_value_t = 5000, value_name = "ROWS",
              value_parser = clap::value_parser!(u64).range(1..=100_000))]
        chunk_size: u64,
    },
}

// ---- credentials ---------------------------------------------------------------------------

#[derive(Subcommand, Debug)]
enum CredentialsCmd {
    /// Lists a device's credentials (no secrets).
    #[command(after_help = "Example:\n  ferrohub ctl credentials list boiler-17")]
    List {
        /// Device id.
        device: String,
    },
    /// Adds a password to a device and prints it (once: only a hash is stored). Devices connect
    /// over MQTT with the user name TENANT/DEVICE and this password.
    #[command(
        after_help = "Examples:\n  PASSWORD=$(ferrohub ctl credentials add-password boiler-17)\n  \
        ferrohub ctl credentials add-password boiler-17 --rotate-overlap 3600   # old passwords stop in an hour"
    )]
    AddPassword {
        /// Device id.
        device: String,
        /// The password (8 to 1024 bytes); generated when absent.
        #[arg(long)]
        secret: Option<String>,
        /// Rotation: the device's other passwords stop working after this many seconds.
        #[arg(long, value_name = "SECS")]
        rotate_overlap: Option<u64>,
    },
    /// Issues a device certificate from the tenant's built-in CA and writes DEVICE.crt,
    /// DEVICE.key (mode 0600; not with --csr) and ca.crt.
    #[command(
        after_help = "Examples:\n  ferrohub ctl credentials issue-cert boiler-17 --out-dir ./certs\n  \
        ferrohub ctl credentials issue-cert boiler-17 --csr boiler-17.csr   # the key stays on the device"
    )]
    IssueCert {
        /// Device id.
        device: String,
        /// Sign this certificate signing request (PEM) instead of generating a key.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
        /// Where to write the files.
        #[arg(long, default_value = ".", value_name = "DIR")]
        out_dir: PathBuf,
        /// Rotation: the device's other certificates stop working after this many seconds.
        #[arg(long, value_name = "SECS")]
        rotate_overlap: Option<u64>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Revokes a credential; the device's connections are closed.
    #[command(after_help = "Example:\n  ferrohub ctl credentials revoke boiler-17 cred_4f2a...")]
    Revoke {
        /// Device id.
        device: String,
        /// Credential id (from `credentials list`).
        credential: String,
    },
    /// Prints the certificate (PEM) of the tenant's built-in CA, which signs the certificates
    /// `issue-cert` issues: devices and their clients trust it.
    #[command(after_help = "Example:\n  ferrohub ctl credentials ca-cert > acme-ca.pem")]
    CaCert,
    /// Issues a hub-signed device JWT and prints it: the device's MQTT password.
    #[command(after_help = "Example:\n  ferrohub ctl credentials token boiler-17 --ttl 86400")]
    Token {
        /// Device id.
        device: String,
        /// Validity in seconds (60 s to 30 days).
        #[arg(long, default_value_t = 86_400, value_name = "SECS")]
        ttl: u64,
    },
}

// ---- groups, policies, tokens --------------------------------------------------------------

#[derive(Subcommand, Debug)]
enum GroupsCmd {
    /// Lists the tenant's groups.
    #[command(after_help = "Example:\n  ferrohub ctl groups list")]
    List,
    /// Shows a group (its devices: `devices list --group NAME`).
    #[command(after_help = "Example:\n  ferrohub ctl groups show wave-1")]
    Show {
        /// Group name.
        name: String,
    },
    /// Creates or replaces a group: static without filters (add devices with `groups add`),
    /// dynamic with them (its members are the devices that match, at any moment).
    #[command(
        after_help = "Examples:\n  ferrohub ctl groups create wave-1 --description \"first rollout wave\"\n  \
        ferrohub ctl groups create plant-a --query site=plant-a --status enabled"
    )]
    Create {
        /// Group name.
        name: String,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Dynamic group: devices with this tag; repeat for several (all must match).
        #[arg(long = "query", value_name = "KEY=VALUE", value_parser = parse_kv)]
        query: Vec<(String, String)>,
        /// Dynamic group: devices of this type.
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        /// Dynamic group: devices with this status.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Dynamic group: devices whose name starts with this.
        #[arg(long, value_name = "PREFIX")]
        name_prefix: Option<String>,
        /// Dynamic group: devices connected now.
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Dynamic group: devices not connected now.
        #[arg(long)]
        offline: bool,
    },
    /// Adds a device to a static group.
    #[command(after_help = "Example:\n  ferrohub ctl groups add wave-1 boiler-17")]
    Add {
        /// Group name.
        name: String,
        /// Device id.
        device: String,
    },
    /// Removes a device from a static group.
    #[command(after_help = "Example:\n  ferrohub ctl groups remove wave-1 boiler-17")]
    Remove {
        /// Group name.
        name: String,
        /// Device id.
        device: String,
    },
    /// Deletes a group (its devices stay).
    #[command(after_help = "Example:\n  ferrohub ctl groups delete wave-1")]
    Delete {
        /// Group name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PoliciesCmd {
    /// Lists the tenant's named policies.
    #[command(after_help = "Example:\n  ferrohub ctl policies list")]
    List,
    /// Prints a policy document (JSON).
    #[command(after_help = "Example:\n  ferrohub ctl policies show thermostats > thermostats.json")]
    Show {
        /// Policy name.
        name: String,
    },
    /// Creates or replaces a policy from a JSON document (admin); devices under it get the new
    /// one at once.
    #[command(
        after_help = "Example:\n  ferrohub ctl policies put thermostats thermostats.json\n\n\
        thermostats.json:\n  {\"version\": 1, \"statements\": [\n    \
        {\"effect\": \"allow\", \"actions\": [\"connect\"], \"resources\": [\"${device.id}\"]},\n    \
        {\"effect\": \"allow\", \"actions\": [\"publish\"], \"resources\": [\"devices/${device.id}/telemetry/#\"]}]}"
    )]
    Put {
        /// Policy name.
        name: String,
        /// The document (JSON), or `-` for standard input.
        file: PathBuf,
    },
    /// Deletes a policy (admin); devices that named it fall back to the default policy.
    #[command(after_help = "Example:\n  ferrohub ctl policies delete thermostats")]
    Delete {
        /// Policy name.
        name: String,
    },
}

/// Role of an API token.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Everything, in its scope.
    Admin,
    /// Devices, credentials, groups, device types, imports.
    Operator,
    /// Reads.
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

#[derive(Subcommand, Debug)]
enum TokensCmd {
    /// Lists the API tokens in the caller's scope (no secrets).
    #[command(after_help = "Example:\n  ferrohub ctl tokens list")]
    List,
    /// Creates an API token scoped to --tenant (or platform-wide with --platform, admin role
    /// only) and prints its secret (once: only a hash is stored).
    #[command(
        after_help = "Examples:\n  ferrohub ctl tokens create ci-deployer --role operator --tenant acme --ttl 2592000\n  \
        ferrohub ctl tokens create ops-admin --role admin --platform"
    )]
    Create {
        /// Who or what uses it.
        name: String,
        /// Role.
        #[arg(long, value_enum)]
        role: Role,
        /// A platform-wide token (admin role) instead of one scoped to --tenant.
        #[arg(long)]
        platform: bool,
        /// Validity in seconds (default: no expiry).
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
    },
    /// Revokes an API token; it stops working at once.
    #[command(after_help = "Example:\n  ferrohub ctl tokens revoke tok_4f2a...")]
    Revoke {
        /// Token id (`tok_...`, not the secret).
        id: String,
    },
}

/// Result of an audited action.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum AuditResult {
    /// It happened.
    Success,
    /// It was refused or failed.
    Failure,
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// Actions starting with this (`device.` matches every device action).
    #[arg(long, value_name = "PREFIX")]
    action: Option<String>,
    /// Only this actor: `token:<id>`, `device:<tenant>/<id>` or `system`.
    #[arg(long)]
    actor: Option<String>,
    /// Only this target (device id, token id, ...).
    #[arg(long)]
    target: Option<String>,
    /// Only successes or only failures.
    #[arg(long, value_enum)]
    result: Option<AuditResult>,
    /// From this time: RFC 3339 (2026-01-31T08:00:00Z) or a duration ago (90s, 15m, 1h, 7d).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<i64>,
    /// Until this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
    /// Number of events, 1 to 1000.
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Events older than this sequence number (the next page).
    #[arg(long, value_name = "SEQ")]
    before_seq: Option<i64>,
    /// Events of every tenant (platform-wide tokens) instead of --tenant's.
    #[arg(long)]
    all_tenants: bool,
}

// ---- argument parsers ----------------------------------------------------------------------

/// `key=value` (split at the first `=`).
fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE (e.g. site=plant-a)")),
    }
}

/// Milliseconds since the epoch of an RFC 3339 time or of "now minus a duration".
fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let at = if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        t
    } else if let Ok(d) = humantime::parse_duration(s) {
        std::time::SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{s:?} reaches back before 1970"))?
    } else {
        return Err(format!(
            "{s:?} is neither an RFC 3339 time (2026-01-31T08:00:00Z) nor a duration (15m, 1h, 7d)"
        ));
    };
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis();
    i64::try_from(ms).map_err(|_| format!("{s:?} is too far in the future"))
}

// ---- running -------------------------------------------------------------------------------

/// Seconds to wait for each answer of the hub when `--timeout` is not given.
const DEFAULT_TIMEOUT: u64 = 120;

/// What every command needs.
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) tenant: String,
    pub(crate) output: Output,
    /// `--timeout`, when it was given.
    pub(crate) timeout: Option<u64>,
}

/// Runs `ferrohub ctl` and returns the process exit status: 0 on success, 1 when the command
/// failed (after printing the error and a hint on stderr) or an import rejected rows.
pub fn run(args: CtlArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            1
        }
    }
}

fn report_error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
    if let Some(hint) = e
        .chain()
        .find_map(|c| c.downcast_ref::<Failure>())
        .and_then(|f| f.hint.as_deref())
    {
        eprintln!("hint: {hint}");
    }
}

async fn execute(args: CtlArgs) -> anyhow::Result<i32> {
    // A direct command keeps the request open while the device answers: wait longer than that.
    let http_timeout = match &args.command {
        CtlCommand::Commands(c) => device_commands::direct_wait(c, args.timeout).map(|w| w + 15),
        _ => None,
    }
    .unwrap_or(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let client = Client::new(
        &args.url,
        args.token.as_deref(),
        args.ca_file.as_deref(),
        Duration::from_secs(http_timeout),
    )?;
    let ctx = Ctx {
        client,
        tenant: args.tenant,
        output: args.output,
        timeout: args.timeout,
    };
    commands::dispatch(&ctx, args.command).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values() {
        assert_eq!(
            parse_kv("site=plant-a"),
            Ok(("site".into(), "plant-a".into()))
        );
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_kv("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_kv("nokey").is_err());
        assert!(parse_kv("=v").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        let now = parse_time("0s").unwrap_or_default();
        let hour_ago = parse_time("1h").unwrap_or_default();
        assert!((now - hour_ago - 3_600_000).abs() < 5_000);
        assert!(parse_time("yesterday").is_err());
    }
}
