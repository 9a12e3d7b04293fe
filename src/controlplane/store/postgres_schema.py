"""The PostgreSQL store's schema: its migrations, in order, and the version they reach.

`PostgresStore.open()` applies the ones a database lacks under an advisory lock, each in one
transaction, and records them in the table ``taskrun_schema``. Never edit a released migration:
append a new one. Row mapping (columns, encodings) is shared with SQLite in rows.py.
"""

from __future__ import annotations

from typing import Final

# Each migration is a tuple of statements applied in one transaction; the table taskrun_schema
# records which have been applied. Never edit a released migration: append a new one.
# Ids and names that are listed in order are COLLATE "C": byte order, as in SQLite and memory.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE tasks (
            id               text COLLATE "C" PRIMARY KEY,
            agent            text NOT NULL,
            input            text NOT NULL,
            labels           jsonb NOT NULL,
            policy           jsonb NOT NULL,
            status           smallint NOT NULL,
            attempts         integer NOT NULL,
            current_run_id   text,
            worker_id        text,
            created_at       bigint NOT NULL,  -- microseconds since the epoch, UTC
            updated_at       bigint NOT NULL,
            finished_at      bigint,
            error            text NOT NULL,
            result           text NOT NULL,
            usage            jsonb NOT NULL,
            schedule         text NOT NULL,
            cancel_requested smallint NOT NULL,
            idempotency_key  text NOT NULL  -- copy of policy.idempotency_key, for the index
        )""",
        "CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)"
        " WHERE idempotency_key <> ''",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE INDEX tasks_unfinished ON tasks (id) WHERE status IN (1, 2)",
        "CREATE INDEX tasks_agent ON tasks (agent, id)",
        "CREATE INDEX tasks_worker ON tasks (worker_id, id) WHERE worker_id IS NOT NULL",
        "CREATE INDEX tasks_schedule ON tasks (schedule, id) WHERE schedule <> ''",
        "CREATE INDEX tasks_labels ON tasks USING gin (labels jsonb_path_ops)",
        """CREATE TABLE runs (
            id           text COLLATE "C" PRIMARY KEY,
            task_id      text NOT NULL REFERENCES tasks (id),
            attempt      integer NOT NULL,
            status       smallint NOT NULL,
            worker_id    text,
            created_at   bigint NOT NULL,
            assigned_at  bigint,
            started_at   bigint,
            finished_at  bigint,
            error        text NOT NULL,
            result       text NOT NULL,
            usage        jsonb NOT NULL,
            backend_used jsonb,
            session_id   text NOT NULL,
            prompt       text NOT NULL
        )""",
        "CREATE INDEX runs_task ON runs (task_id, attempt, id)",
        "CREATE INDEX runs_unfinished ON runs (id) WHERE status IN (1, 2, 3)",
        """CREATE TABLE workers (
            id                     text COLLATE "C" PRIMARY KEY,
            hostname               text NOT NULL,
            version                text NOT NULL,
            agents                 jsonb NOT NULL,
            labels                 jsonb NOT NULL,
            max_concurrent_runs    integer NOT NULL,
            status                 smallint NOT NULL,
            first_seen_at          bigint,
            connected_at           bigint,
            last_heartbeat_at      bigint,
            certificate_expires_at bigint,
            revoked_at             bigint,
            revoked_reason         text NOT NULL,
            enrolled_labels        jsonb NOT NULL,
            enrolled_at            bigint
        )""",
        "CREATE INDEX workers_status ON workers (status, id)",
        """CREATE TABLE output (
            run_id  text NOT NULL REFERENCES runs (id),
            attempt integer NOT NULL,
            seq     bigint NOT NULL,
            kind    smallint NOT NULL,
            data    text NOT NULL,
            time    bigint,
            PRIMARY KEY (run_id, attempt, seq)
        )""",
        """CREATE TABLE schedules (
            name           text COLLATE "C" PRIMARY KEY,
            agent          text NOT NULL,
            input          text NOT NULL,
            labels         jsonb NOT NULL,
            policy         jsonb NOT NULL,
            cron           text NOT NULL,
            rrule          text NOT NULL,
            timezone       text NOT NULL,
            misfire        smallint NOT NULL,
            overlap        smallint NOT NULL,
            paused         smallint NOT NULL,
            created_at     bigint NOT NULL,
            updated_at     bigint NOT NULL,
            last_fire_time bigint,
            next_fire_time bigint,
            last_task_id   text,
            last_outcome   text NOT NULL
        )""",
        """CREATE TABLE bootstrap_tokens (
            id           text COLLATE "C" PRIMARY KEY,
            secret_hash  text NOT NULL,  -- SHA-256 of the secret, hex
            worker_id    text NOT NULL,
            created_at   bigint NOT NULL,
            expires_at   bigint NOT NULL,
            labels       jsonb NOT NULL,
            created_by   text NOT NULL,
            used_at      bigint,
            used_by_host text NOT NULL,
            revoked_at   bigint
        )""",
        "CREATE INDEX bootstrap_tokens_created ON bootstrap_tokens (created_at, id)",
        """CREATE TABLE api_tokens (
            id          text COLLATE "C" PRIMARY KEY,
            secret_hash text NOT NULL,  -- SHA-256 of the secret, hex
            name        text NOT NULL,
            scopes      jsonb NOT NULL,  -- array of scope names, sorted
            created_at  bigint NOT NULL,
            expires_at  bigint,          -- NULL: does not expire
            created_by  text NOT NULL,
            revoked_at  bigint
        )""",
        "CREATE INDEX api_tokens_created ON api_tokens (created_at, id)",
        # ids are given by the writer (max + 1, in its transaction): increasing, without gaps,
        # never reused (retention keeps at least one event), as in SQLite
        """CREATE TABLE audit_events (
            id        bigint PRIMARY KEY,
            time      bigint NOT NULL,
            kind      text NOT NULL,
            principal text NOT NULL,
            subject   text NOT NULL,
            peer      text NOT NULL,
            detail    text NOT NULL
        )""",
        "CREATE INDEX audit_events_kind ON audit_events (kind, id)",
        # one row rewritten by `resume` to learn whether the store can write again
        """CREATE TABLE store_probe (
            id         integer PRIMARY KEY CHECK (id = 1),
            written_at bigint NOT NULL
        )""",
    ),
    # 2: webhooks: subscriptions and their durable deliveries
    (
        """CREATE TABLE webhooks (
            id          text PRIMARY KEY,
            url         text NOT NULL,
            events      text NOT NULL,  -- JSON array of event names, sorted
            secret      text NOT NULL,  -- whsec_…: needed to sign, so kept as given
            created_at  bigint NOT NULL,
            labels      text NOT NULL,  -- JSON object
            agent       text NOT NULL,
            schedule    text NOT NULL,
            description text NOT NULL,
            created_by  text NOT NULL
        )""",
        "CREATE INDEX webhooks_created ON webhooks (created_at, id)",
        """CREATE TABLE webhook_deliveries (
            id               text PRIMARY KEY,
            webhook_id       text NOT NULL,
            event            text NOT NULL,
            event_key        text NOT NULL,
            payload          text NOT NULL,
            created_at       bigint NOT NULL,
            next_attempt_at  bigint NOT NULL,
            status           text NOT NULL,
            attempts         integer NOT NULL,
            last_status_code integer NOT NULL,
            last_error       text NOT NULL,
            delivered_at     bigint,
            UNIQUE (webhook_id, event_key)
        )""",
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at, id)",
        "CREATE INDEX webhook_deliveries_of ON webhook_deliveries (webhook_id, created_at, id)",
        "CREATE INDEX webhook_deliveries_new ON webhook_deliveries (created_at, id)",
    ),
    # 3: conversations: turns are tasks; the transcript and the agent's session live here
    (
        "ALTER TABLE tasks ADD COLUMN conversation_id text",
        "ALTER TABLE tasks ADD COLUMN turn integer NOT NULL DEFAULT 0",
        """CREATE TABLE conversations (
            id                 text PRIMARY KEY,
            agent              text NOT NULL,
            title              text NOT NULL,
            labels             text NOT NULL,  -- JSON object
            input              text NOT NULL,  -- JSON object: agent options of every turn
            policy             text NOT NULL,  -- JSON object, the policy of every turn
            created_at         bigint NOT NULL,
            updated_at         bigint NOT NULL,
            turns              integer NOT NULL,
            usage              text NOT NULL,  -- JSON object, summed over turns
            session_id         text NOT NULL,
            session_snapshot   bytea NOT NULL,  -- zlib-compressed session file, or empty
            session_cost_usd   double precision NOT NULL,
            session_turn       integer NOT NULL,
            summarized_through integer NOT NULL,
            summary            text NOT NULL
        )""",
        "CREATE INDEX conversations_agent ON conversations (agent, id)",
        """CREATE TABLE turns (
            conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            idx             integer NOT NULL,
            task_id         text NOT NULL REFERENCES tasks (id),
            message         text NOT NULL,
            created_at      bigint NOT NULL,
            status          integer NOT NULL,
            answer          text NOT NULL,
            tools           text NOT NULL,  -- compact JSON array
            error           text NOT NULL,
            usage           text NOT NULL,  -- JSON object: this turn's own spending
            finished_at     bigint,
            PRIMARY KEY (conversation_id, idx)
        )""",
    ),
    # 4: workflow definitions (every version kept) and workflow runs
    (
        """CREATE TABLE workflows (
            name        text NOT NULL,
            version     integer NOT NULL,
            definition  text NOT NULL,  -- the parsed document, as JSON
            description text NOT NULL,
            created_at  bigint NOT NULL,
            PRIMARY KEY (name, version)
        )""",
        """CREATE TABLE workflow_runs (
            id              text PRIMARY KEY,
            workflow        text NOT NULL,
            version         integer NOT NULL,
            input           text NOT NULL,  -- JSON
            status          integer NOT NULL,
            created_at      bigint NOT NULL,
            updated_at      bigint NOT NULL,
            finished_at     bigint,
            idempotency_key text UNIQUE,  -- NULL when none
            error           text NOT NULL,
            schedule        text NOT NULL,
            steps           text NOT NULL,  -- JSON: each step's state
            FOREIGN KEY (workflow, version) REFERENCES workflows (name, version)
        )""",
        "CREATE INDEX workflow_runs_of ON workflow_runs (workflow, created_at, id)",
        "CREATE INDEX workflow_runs_new ON workflow_runs (created_at, id)",
        "CREATE INDEX workflow_runs_unfinished ON workflow_runs (status) WHERE status = 1",
        # a schedule may start a workflow instead of a task
        "ALTER TABLE schedules ADD COLUMN workflow text NOT NULL DEFAULT ''",
    ),
    # 5: sub-tasks: a task created by a run of another names it, and the root of its tree; a
    # run of a task that allows sub-tasks holds the hash of its credential
    (
        'ALTER TABLE tasks ADD COLUMN parent_task_id text COLLATE "C"',
        'ALTER TABLE tasks ADD COLUMN root_task_id text COLLATE "C"',
        "ALTER TABLE tasks ADD COLUMN depth integer NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_parent ON tasks (parent_task_id, id) WHERE parent_task_id IS NOT NULL",
        "CREATE INDEX tasks_root ON tasks (root_task_id, id) WHERE root_task_id IS NOT NULL",
        "ALTER TABLE runs ADD COLUMN credential_hash text NOT NULL DEFAULT ''",
    ),
    # 6: ListTasks by agent and status
    (
        # ListTasks by agent and status (an agent's unfinished tasks) without walking a deep
        # queue of other agents' pending tasks, or every finished task of the agent
        "CREATE INDEX tasks_agent_status ON tasks (agent, status, id)",
    ),
    # 7: leadership of several control planes (see postgres_lease.py): one lease row whose
    # epoch every write checks, and the control planes that share the database
    (
        """CREATE TABLE taskrun_leader (
            id         integer PRIMARY KEY CHECK (id = 1),
            epoch      bigint NOT NULL,  -- +1 on every takeover
            holder     text NOT NULL,    -- control plane id, '' when released
            address    text NOT NULL,    -- where workers and clients reach it (mTLS)
            public_address text NOT NULL,  -- its TLS-only listener (API tokens), or ''
            since      bigint NOT NULL,  -- the database's clock, microseconds
            expires_at bigint NOT NULL   -- the database's clock, microseconds
        )""",
        "INSERT INTO taskrun_leader VALUES (1, 0, '', '', '', 0, 0)",
        """CREATE TABLE taskrun_control_planes (
            id         text PRIMARY KEY,
            address    text NOT NULL,
            hostname   text NOT NULL,
            pid        integer NOT NULL,
            version    text NOT NULL,
            started_at bigint NOT NULL,
            seen_at    bigint NOT NULL,
            workers    jsonb NOT NULL  -- ids of the workers connected to it
        )""",
    ),
    # 8: the durable event log (WatchEvents resumes after a position, also across a failover)
    (
        """CREATE TABLE events (
            position  bigint PRIMARY KEY,  -- given by the leading control plane, increasing
            kind      smallint NOT NULL,
            task_id   text NOT NULL,
            worker_id text NOT NULL,
            data      bytea NOT NULL  -- the event as the wire carries it (taskrun.v1.Event)
        )""",
    ),
    # 9: the day's spending is read back at start (and by `taskrun usage`) by when runs ended:
    # without this index that read scans every run ever stored; a failed run says whose fault
    # it was (core.status.Fault)
    (
        "CREATE INDEX runs_finished ON runs (finished_at, id) WHERE finished_at IS NOT NULL",
        "ALTER TABLE runs ADD COLUMN fault smallint NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
