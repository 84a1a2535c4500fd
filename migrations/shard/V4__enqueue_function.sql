-- shardq.enqueue(): enqueue a job from SQL, e.g. from an application trigger,
-- so a row change and its job commit (or roll back) together. The insert
-- fires the jobs_notify statement trigger like any other insert.
--
-- Checks what the Rust client checks, with messages naming the field:
-- account 1-255 bytes, queue 1-128 bytes, kind 1-255 bytes, args a JSON
-- document of at most 262144 bytes of text, max_attempts at least 1.
-- Errors are raised with SQLSTATE 22023 (invalid_parameter_value) and abort
-- the calling statement, so nothing is written.
--
-- Note: triggers (and so trigger-driven enqueues) do not fire while
-- session_replication_role = replica, as for every Postgres trigger.
CREATE FUNCTION shardq.enqueue(
    account      text,
    queue        text,
    kind         text,
    args         jsonb DEFAULT '{}',
    priority     smallint DEFAULT 0,
    max_attempts int DEFAULT 20,
    run_at       timestamptz DEFAULT now()
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
    args_bytes int;
BEGIN
    IF account IS NULL OR octet_length(account) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'shardq.enqueue: account must be 1 to 255 bytes, got %',
            coalesce(octet_length(account)::text || ' bytes', 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF queue IS NULL OR octet_length(queue) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'shardq.enqueue: queue must be 1 to 128 bytes, got %',
            coalesce(octet_length(queue)::text || ' bytes', 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind IS NULL OR octet_length(kind) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'shardq.enqueue: kind must be 1 to 255 bytes, got %',
            coalesce(octet_length(kind)::text || ' bytes', 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF args IS NULL THEN
        RAISE EXCEPTION 'shardq.enqueue: args must be a JSON document, got NULL (use ''{}'')'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    args_bytes := octet_length(args::text);
    IF args_bytes > 262144 THEN
        RAISE EXCEPTION 'shardq.enqueue: args: % bytes of JSON exceed the cap of 262144', args_bytes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF priority IS NULL THEN
        RAISE EXCEPTION 'shardq.enqueue: priority must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'shardq.enqueue: max_attempts must be at least 1, got %', coalesce(max_attempts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at)
    VALUES (enqueue.account, enqueue.queue, enqueue.kind, enqueue.args, enqueue.priority,
            enqueue.max_attempts, coalesce(enqueue.run_at, now()))
    RETURNING id INTO new_id;
    RETURN new_id;
END;
$$;
