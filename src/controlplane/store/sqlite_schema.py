"""The SQLite store's schema: its migrations, in order, and the version they reach.

`SqliteStore.open()` applies the ones a file lacks, each in one transaction, and records how many
it has in ``PRAGMA user_version``. Never edit a released migration: append a new one. Row
mapping (columns, encodings) is shared with PostgreSQL in rows.py.
"""

from __future__ import annotations

from typing import Final

# Each migration is a tuple of statements applied in one transaction; PRAGMA user_version records
# how many have been applied. Never edit a released migration: append a new one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE tasks (
            id               TEXT PRIMARY KEY,
            agent            TEXT NOT NULL,
            input            TEXT NOT NULL,
            labels           TEXT NOT NULL,  -- JSON object
            policy           TEXT NOT NULL,  -- JSON object
            status           INTEGER NOT NULL,
            attempts         INTEGER NOT NULL,
            current_run_id   TEXT,
            worker_id        TEXT,
            created_at       INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            updated_at       INTEGER NOT NULL,
            finished_at      INTEGER,
            error            TEXT NOT NULL,
            result           TEXT NOT NULL,
            usage            TEXT NOT NULL,  -- JSON object
            schedule         TEXT NOT NULL,
            cancel_requested INTEGER NOT NULL,
            idempotency_key  TEXT NOT NULL   -- copy of policy.idempotency_key, for the index
        )""",
        "CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)"
        " WHERE idempotency_key <> ''",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE INDEX tasks_agent ON tasks (agent, id)",
        "CREATE INDEX tasks_worker ON tasks (worker_id, id) WHERE worker_id IS NOT NULL",
        "CREATE INDEX tasks_schedule ON tasks (schedule, id) WHERE schedule <> ''",
        """CREATE TABLE runs (
            id           TEXT PRIMARY KEY,
            task_id      TEXT NOT NULL REFERENCES tasks (id),
            attempt      INTEGER NOT NULL,
            status       INTEGER NOT NULL,
            worker_id    TEXT,
            created_at   INTEGER NOT NULL,
            assigned_at  INTEGER,
            started_at   INTEGER,
            finished_at  INTEGER,
            error        TEXT NOT NULL,
            result       TEXT NOT NULL,
            usage        TEXT NOT NULL,  -- JSON object
            backend_used TEXT,           -- JSON object or NULL
            session_id   TEXT NOT NULL,
            prompt       TEXT NOT NULL
        )""",
        "CREATE INDEX runs_task ON runs (task_id, attempt)",
        "CREATE INDEX runs_unfinished ON runs (status, id) WHERE status IN (1, 2, 3)",
        """CREATE TABLE workers (
            id                     TEXT PRIMARY KEY,
            hostname               TEXT NOT NULL,
            version                TEXT NOT NULL,
            agents                 TEXT NOT NULL,  -- JSON array of agent specs
            labels                 TEXT NOT NULL,  -- JSON object
            max_concurrent_runs    INTEGER NOT NULL,
            status                 INTEGER NOT NULL,
            first_seen_at          INTEGER,
            connected_at           INTEGER,
            last_heartbeat_at      INTEGER,
            certificate_expires_at INTEGER
        )""",
        """CREATE TABLE output (
            run_id  TEXT NOT NULL REFERENCES runs (id),
            attempt INTEGER NOT NULL,
            seq     INTEGER NOT NULL,
            kind    INTEGER NOT NULL,
            data    TEXT NOT NULL,
            time    INTEGER,
            PRIMARY KEY (run_id, attempt, seq)
        ) WITHOUT ROWID""",
    ),
    # 2: schedules (recurring rules that create tasks)
    (
        """CREATE TABLE schedules (
            name           TEXT PRIMARY KEY,
            agent          TEXT NOT NULL,
            input          TEXT NOT NULL,
            labels         TEXT NOT NULL,  -- JSON object
            policy         TEXT NOT NULL,  -- JSON object, the policy of the tasks it creates
            cron           TEXT NOT NULL,
            rrule          TEXT NOT NULL,
            timezone       TEXT NOT NULL,
            misfire        INTEGER NOT NULL,
            overlap        INTEGER NOT NULL,
            paused         INTEGER NOT NULL,
            created_at     INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            updated_at     INTEGER NOT NULL,
            last_fire_time INTEGER,
            next_fire_time INTEGER,
            last_task_id   TEXT,
            last_outcome   TEXT NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 3: worker revocation (operators cut an identity off for good)
    (
        "ALTER TABLE workers ADD COLUMN revoked_at INTEGER",
        "ALTER TABLE workers ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT ''",
    ),
    # 4: access control (bootstrap tokens, API tokens, audit events, labels bound at enrollment)
    (
        """CREATE TABLE bootstrap_tokens (
            id           TEXT PRIMARY KEY,
            secret_hash  TEXT NOT NULL,  -- SHA-256 of the secret, hex
            worker_id    TEXT NOT NULL,
            created_at   INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            expires_at   INTEGER NOT NULL,
            labels       TEXT NOT NULL,  -- JSON object
            created_by   TEXT NOT NULL,
            used_at      INTEGER,
            used_by_host TEXT NOT NULL,
            revoked_at   INTEGER
        ) WITHOUT ROWID""",
        """CREATE TABLE api_tokens (
            id          TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,  -- SHA-256 of the secret, hex
            name        TEXT NOT NULL,
            scopes      TEXT NOT NULL,  -- JSON array of scope names, sorted
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            expires_at  INTEGER,           -- NULL: does not expire
            created_by  TEXT NOT NULL,
            revoked_at  INTEGER
        ) WITHOUT ROWID""",
        """CREATE TABLE audit_events (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- increasing, never reused
            time      INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            kind      TEXT NOT NULL,
            principal TEXT NOT NULL,
            subject   TEXT NOT NULL,
            peer      TEXT NOT NULL,
            detail    TEXT NOT NULL
        )""",
        "CREATE INDEX audit_events_kind ON audit_events (kind, id)",
        "ALTER TABLE workers ADD COLUMN enrolled_labels TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE workers ADD COLUMN enrolled_at INTEGER",
    ),
    # 5: one row rewritten by `resume` to learn whether the store can write again
    (
        """CREATE TABLE store_probe (
            id         INTEGER PRIMARY KEY CHECK (id = 1),
            written_at INTEGER NOT NULL  -- microseconds since the epoch, UTC
        )""",
    ),
    # 6: webhooks: subscriptions and their durable deliveries
    (
        """CREATE TABLE webhooks (
            id          TEXT PRIMARY KEY,
            url         TEXT NOT NULL,
            events      TEXT NOT NULL,  -- JSON array of event names, sorted
            secret      TEXT NOT NULL,  -- whsec_…: needed to sign, so kept as given
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            labels      TEXT NOT NULL,  -- JSON object
            agent       TEXT NOT NULL,
            schedule    TEXT NOT NULL,
            description TEXT NOT NULL,
            created_by  TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE webhook_deliveries (
            id               TEXT PRIMARY KEY,
            webhook_id       TEXT NOT NULL,
            event            TEXT NOT NULL,
            event_key        TEXT NOT NULL,
            payload          TEXT NOT NULL,
            created_at       INTEGER NOT NULL,
            next_attempt_at  INTEGER NOT NULL,
            status           TEXT NOT NULL,
            attempts         INTEGER NOT NULL,
            last_status_code INTEGER NOT NULL,
            last_error       TEXT NOT NULL,
            delivered_at     INTEGER,
            UNIQUE (webhook_id, event_key)
        ) WITHOUT ROWID""",
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at)",
        "CREATE INDEX webhook_deliveries_of ON webhook_deliveries (webhook_id, created_at)",
    ),
    # 7: conversations: turns are tasks; the transcript and the agent's session live here
    (
        "ALTER TABLE tasks ADD COLUMN conversation_id TEXT",
        "ALTER TABLE tasks ADD COLUMN turn INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE conversations (
            id                 TEXT PRIMARY KEY,
            agent              TEXT NOT NULL,
            title              TEXT NOT NULL,
            labels             TEXT NOT NULL,  -- JSON object
            input              TEXT NOT NULL,  -- JSON object: agent options of every turn
            policy             TEXT NOT NULL,  -- JSON object, the policy of every turn
            created_at         INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            updated_at         INTEGER NOT NULL,
            turns              INTEGER NOT NULL,
            usage              TEXT NOT NULL,  -- JSON object, summed over turns
            session_id         TEXT NOT NULL,
            session_snapshot   BLOB NOT NULL,  -- zlib-compressed session file, or empty
            session_cost_usd   REAL NOT NULL,  -- the session's running total at the snapshot
            session_turn       INTEGER NOT NULL,  -- the turn that left the session so
            summarized_through INTEGER NOT NULL,
            summary            TEXT NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX conversations_agent ON conversations (agent, id)",
        """CREATE TABLE turns (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            idx             INTEGER NOT NULL,
            task_id         TEXT NOT NULL REFERENCES tasks (id),
            message         TEXT NOT NULL,
            created_at      INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            status          INTEGER NOT NULL,
            answer          TEXT NOT NULL,
            tools           TEXT NOT NULL,  -- compact JSON array
            error           TEXT NOT NULL,
            usage           TEXT NOT NULL,  -- JSON object: this turn's own spending
            finished_at     INTEGER,
            PRIMARY KEY (conversation_id, idx)
        ) WITHOUT ROWID""",
    ),
    # 8: workflow definitions (every version kept) and workflow runs
    (
        """CREATE TABLE workflows (
            name        TEXT NOT NULL,
            version     INTEGER NOT NULL,
            definition  TEXT NOT NULL,  -- the parsed document, as JSON
            description TEXT NOT NULL,
            created_at  INTEGER NOT NULL,  -- microseconds since the epoch, UTC
            PRIMARY KEY (name, version)
        ) WITHOUT ROWID""",
        """CREATE TABLE workflow_runs (
            id              TEXT PRIMARY KEY,
            workflow        TEXT NOT NULL,
            version         INTEGER NOT NULL,
            input           TEXT NOT NULL,  -- JSON
            status          INTEGER NOT NULL,
            created_at      INTEGER NOT NULL,
            updated_at      INTEGER NOT NULL,
            finished_at     INTEGER,
            idempotency_key TEXT,  -- NULL when none; unique otherwise
            error           TEXT NOT NULL,
            schedule        TEXT NOT NULL,
            steps           TEXT NOT NULL,  -- JSON: each step's state
            UNIQUE (idempotency_key),
            FOREIGN KEY (workflow, version) REFERENCES workflows (name, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX workflow_runs_of ON workflow_runs (workflow, created_at)",
        "CREATE INDEX workflow_runs_unfinished ON workflow_runs (status) WHERE status = 1",
        # a schedule may start a workflow instead of a task
        "ALTER TABLE schedules ADD COLUMN workflow TEXT NOT NULL DEFAULT ''",
    ),  # 9: the durable event log (WatchEvents resumes after a position, also across a failover)
    (
        """CREATE TABLE events (
            position  INTEGER PRIMARY KEY,  -- given by the leading control plane, increasing
            kind      INTEGER NOT NULL,
            task_id   TEXT NOT NULL,
            worker_id TEXT NOT NULL,
            data      BLOB NOT NULL  -- the event as the wire carries it (taskrun.v1.Event)
        )""",
    ),
    # sub-tasks: a task created by a run of another names it, and the root of its tree; a
    # run of a task that allows sub-tasks holds the hash of its credential
    (
        "ALTER TABLE tasks ADD COLUMN parent_task_id TEXT",
        "ALTER TABLE tasks ADD COLUMN root_task_id TEXT",
        "ALTER TABLE tasks ADD COLUMN depth INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_parent ON tasks (parent_task_id, id) WHERE parent_task_id IS NOT NULL",
        "CREATE INDEX tasks_root ON tasks (root_task_id, id) WHERE root_task_id IS NOT NULL",
        "ALTER TABLE runs ADD COLUMN credential_hash TEXT NOT NULL DEFAULT ''",
    ),
    (
        # ListTasks by agent and status (an agent's unfinished tasks) without walking a deep
        # queue of other agents' pending tasks, or every finished task of the agent
        "CREATE INDEX tasks_agent_status ON tasks (agent, status, id)",
    ),
    # 12: the day's spending is read back at start (and by `taskrun usage`) by when runs ended:
    # without this index that read scans every run ever stored; a failed run says whose fault
    # it was (core.status.Fault)
    (
        "CREATE INDEX runs_finished ON runs (finished_at, id) WHERE finished_at IS NOT NULL",
        "ALTER TABLE runs ADD COLUMN fault INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
