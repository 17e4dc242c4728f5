-- An event written without its partition (a writer from before partitions, still running in a rolling
-- upgrade, or an INSERT around the store's API) gets it at insert: a catch-up reads one partition's events by
-- their partition column, so a NULL there would be an event no catch-up ever reads. The store's own appends
-- pass the partition, so the WHEN clause skips the function for them (it is evaluated without calling it).

-- SET search_path FROM CURRENT: the deployment's schema, whatever the inserting session's search_path.
CREATE FUNCTION events_fill_partition() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    NEW.partition := stream_partition(NEW.stream_id, (SELECT partitions FROM partitioning));
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_fill_partition BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.partition IS NULL) EXECUTE FUNCTION events_fill_partition();
