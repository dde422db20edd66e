/**
 * Export each image's annotations (scribbles and AI contours) for `wsiseg refine`
 * (QuPath 0.4 – 0.7).
 *
 * Run with: Automate → Script editor → File → Open this script → Run → Run for project
 * (the script changes nothing; "Run for project (without save)" works as well).
 *
 * Writes <OUT_DIR>/<image name without extension>.scribbles.geojson, a GeoJSON
 * FeatureCollection of ALL annotations of the image: the pathologist's scribbles and the
 * (possibly edited) locked AI contours, which wsiseg recognises and compares with what it
 * exported.
 */

import org.locationtech.jts.geom.MultiLineString

import qupath.lib.objects.PathObjects
import qupath.lib.roi.GeometryTools

// ---- settings --------------------------------------------------------------------------
// Folder for the exports. Default: a folder named 'wsiseg' inside the QuPath project folder.
def OUT_DIR = buildFilePath(PROJECT_BASE_DIR, 'wsiseg')
// ----------------------------------------------------------------------------------------

mkdirs(OUT_DIR)
def name = getCurrentImageNameWithoutExtension()
def path = buildFilePath(OUT_DIR, name + '.scribbles.geojson')

// QuPath ≤ 0.7.0 overflows its stack exporting a merged (multi-part) line annotation
// (qupath#2115), which would stop the whole export: export each part as its own line.
def annotations = []
int split = 0
for (annotation in getAnnotationObjects()) {
    def roi = annotation.getROI()
    def geometry = roi == null ? null : roi.getGeometry()
    if (geometry instanceof MultiLineString && geometry.getNumGeometries() > 1) {
        for (int i = 0; i < geometry.getNumGeometries(); i++) {
            def partRoi = GeometryTools.geometryToROI(geometry.getGeometryN(i), roi.getImagePlane())
            def part = PathObjects.createAnnotationObject(partRoi, annotation.getPathClass())
            part.setLocked(annotation.isLocked())
            annotations << part
        }
        split++
    } else {
        annotations << annotation
    }
}

exportObjectsToGeoJson(annotations, path, "FEATURE_COLLECTION")
println "wsiseg: ${name}: ${annotations.size()} annotation(s) exported to ${path}" +
        (split > 0 ? " (${split} merged line annotation(s) exported part by part)" : "")
