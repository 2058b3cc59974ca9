-- Streaming and cancellation (issue 6).
--
-- A job can be cancelled by its customer (POST /v1/jobs/{id}/cancel, or a streaming client
-- that hangs up): status 'cancelled'. One cancelled while queued is settled by the intake at
-- once (its hold released, never billed); one cancelled while running ends as a completion
-- with finish_reason 'cancelled', billed for the tokens it made, or as a failure when it made
-- none. cancel_requested_at records the request, whatever the job did next (it may have
-- finished first).
ALTER TABLE intake.requests DROP CONSTRAINT requests_status_check;
ALTER TABLE intake.requests ADD CONSTRAINT requests_status_check
    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled'));
ALTER TABLE intake.requests ADD COLUMN cancel_requested_at timestamptz;

-- Of prompt_tokens, how many came from the worker's prefix cache (OpenAI's
-- usage.prompt_tokens_details.cached_tokens). NULL on completions recorded before this column.
ALTER TABLE intake.completions ADD COLUMN cached_prompt_tokens integer;
ALTER TABLE intake.requests ADD COLUMN cached_prompt_tokens integer;
