-- Every intake process caches API keys. A change that can make a cached answer wrong is
-- announced on the `intake_keys` channel, and each process drops what it cached for it:
-- 'key:<hex sha256>' for one key (revoked, deleted, or created: a key refused a moment ago
-- may exist now), 'customer:<id>' for every key of a customer whose row changed (its tier,
-- and whatever later migrations add to customers, such as a suspension). NOTIFY is delivered
-- at commit, so a process never drops an entry before the change is visible to its lookup.
CREATE FUNCTION intake.notify_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed record;
BEGIN
    changed := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('intake_keys', 'key:' || encode(changed.key_sha256, 'hex'));
    ELSE
        PERFORM pg_notify('intake_keys', 'customer:' || changed.customer_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_notify AFTER INSERT OR DELETE OR UPDATE ON intake.api_keys
    FOR EACH ROW EXECUTE FUNCTION intake.notify_key_change();
-- Any change to a customer row: rare, and cheaper to announce than to enumerate the columns
-- that matter, which other migrations extend.
CREATE TRIGGER customers_notify AFTER DELETE OR UPDATE ON intake.customers
    FOR EACH ROW EXECUTE FUNCTION intake.notify_key_change();
